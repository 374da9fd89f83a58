"""The online mixing engine: policy, lagged weight schedule, domain cursors, loss feedback.

Protocol, identical on every rank::

    for step in range(start, train_iters):
        for micro_batch in loader:                  # sampler -> mixer.global_batch(step)
            loss = model(...)
            mixer.accumulate(loss, loss_mask, dataset_id)   # ranks holding losses
        optimizer.step()
        record = mixer.step_end(step)              # every rank; collective every N steps

Weights decided after step ``s`` take effect at step ``s + 1 + lag``. The lag lets the data
loader prefetch up to ``lag`` steps ahead while every rank, and every rerun, still agrees on the
weights of every step; asking for a step further ahead raises :class:`PrefetchTooDeepError`
rather than silently sampling with weights that a later update would have changed.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from odm_megatron.distributed import FeedbackReducer
from odm_megatron.feedback import NUM_STATS, DomainLossAccumulator, mean_losses
from odm_megatron.policy import DEFAULT_POLICY, POLICIES, make_policy
from odm_megatron.sampling import advance_cursors, assign_domains
from odm_megatron.state import BanditState, BanditStateError

logger = logging.getLogger(__name__)


class PrefetchTooDeepError(RuntimeError):
    """The data loader asked for a step whose weights are not decided yet."""


@dataclass
class MixerConfig:
    domain_names: List[str]
    seed: int
    global_batch_size: int
    update_interval: int = 10
    """Steps between policy updates (one all-reduce each)."""
    lag: int = 2
    """Steps between an update and the first step sampled with its weights."""
    policy: str = DEFAULT_POLICY
    policy_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.domain_names = [str(n) for n in self.domain_names]
        if not self.domain_names:
            raise ValueError("MixerConfig: no domains")
        if len(set(self.domain_names)) != len(self.domain_names):
            raise ValueError(f"MixerConfig: duplicate domain names in {self.domain_names}")
        if self.seed < 0:
            raise ValueError(f"MixerConfig: seed must be >= 0, got {self.seed}")
        if self.global_batch_size < 1:
            raise ValueError(f"MixerConfig: global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.update_interval < 1:
            raise ValueError(f"MixerConfig: update_interval must be >= 1, got {self.update_interval}")
        if self.lag < 0:
            raise ValueError(f"MixerConfig: lag must be >= 0, got {self.lag}")
        if self.policy not in POLICIES:
            raise ValueError(f"MixerConfig: unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}")

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)


@dataclass
class UpdateRecord:
    """What one policy update saw and decided (one line of mixture.jsonl).

    Steps are 0-based, as everywhere in the mixer (``step_end(0)`` ends the first step); the
    trainer's logs add 1 to report 1-based iterations like Megatron.
    """

    step: int  # the last step of the window
    update: int  # 1-based update counter
    effective_step: int  # first step sampled with ``weights``
    weights: np.ndarray
    mean_loss: np.ndarray  # nan where not observed
    token_counts: np.ndarray
    sampling_probs: np.ndarray  # the distribution that drew the window's samples

    def to_json(self, domain_names: List[str]) -> Dict[str, Any]:
        def by_name(values, cast):
            return {n: cast(v) for n, v in zip(domain_names, values)}

        return {
            "step": self.step,
            "update": self.update,
            "effective_step": self.effective_step,
            "weights": by_name(self.weights, float),
            "loss": by_name(self.mean_loss, lambda v: None if not math.isfinite(v) else float(v)),
            "tokens": by_name(self.token_counts, int),
        }


class OnlineMixer:
    """Decides, identically on every rank, which domain sample each global sample is."""

    def __init__(
        self,
        config: MixerConfig,
        prior: np.ndarray,
        num_samples_per_domain: np.ndarray,
        device: Optional[Union[str, torch.device]] = None,
        reducer: Optional[FeedbackReducer] = None,
    ) -> None:
        self.config = config
        k = config.num_domains
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (k,):
            raise ValueError(f"prior has {prior.size} weights for {k} domains")
        self.num_samples_per_domain = np.asarray(num_samples_per_domain, dtype=np.int64).copy()
        if self.num_samples_per_domain.shape != (k,) or np.any(self.num_samples_per_domain < 1):
            raise ValueError(f"num_samples_per_domain must be {k} positive counts, got {num_samples_per_domain}")
        self.policy = make_policy(config.policy, prior, **config.policy_kwargs)
        self.accumulator = DomainLossAccumulator(k, device)
        self.reducer = reducer if reducer is not None else FeedbackReducer()

        self.completed_steps = 0
        # (effective step, weights), sorted by step; entry i is in force from its step on.
        self._schedule_steps: List[int] = [0]
        self._schedule_weights: List[np.ndarray] = [self.policy.weights()]
        self._cursors = np.zeros(k, dtype=np.int64)  # at the start of step ``completed_steps``
        # Steps generated ahead of training: step -> (domains, positions, cursors after it).
        self._lookahead: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._lookahead_cursors = self._cursors.copy()
        self._restored_window = np.zeros((NUM_STATS, k), dtype=np.int64)
        # the window's sums as of the last step_end; None: nothing since the last update
        self._window_at_step_end: Optional[torch.Tensor] = None

    # -- weights ---------------------------------------------------------------------
    @property
    def domain_names(self) -> List[str]:
        return self.config.domain_names

    @property
    def current_weights(self) -> np.ndarray:
        """The weights of the step being trained now."""
        return self.weights_for_step(self.completed_steps)

    @property
    def latest_weights(self) -> np.ndarray:
        """The most recently decided weights (possibly not in force yet, because of the lag)."""
        return self._schedule_weights[-1].copy()

    def weights_for_step(self, step: int) -> np.ndarray:
        """The weights that sample global batch ``step``."""
        decided_through = self.completed_steps + self.config.lag
        if step > decided_through:
            raise PrefetchTooDeepError(
                f"the data loader asked for step {step}'s batch, but after {self.completed_steps} "
                f"completed steps weights are decided only through step {decided_through} "
                f"(lag={self.config.lag}). Prefetching deeper than the lag would let ranks or reruns "
                f"disagree; raise the lag (--odm-lag) or lower num_workers * prefetch_factor."
            )
        if step < self._schedule_steps[0]:
            raise ValueError(f"weights for step {step} were discarded (earliest kept: {self._schedule_steps[0]})")
        i = bisect.bisect_right(self._schedule_steps, step) - 1
        return self._schedule_weights[i].copy()

    def validate_prefetch(self, num_workers: int, prefetch_factor: Optional[int], num_microbatches: int) -> None:
        """Raise ValueError if a DataLoader so configured would outrun the lag.

        While step s trains its last micro-batch, a loader with ``num_workers * prefetch_factor``
        batches in flight asks for micro-batch ``(s+1)*A - 1 + P``, i.e. step
        ``s + (A - 1 + P) // A``; that must be <= ``s + lag``.
        """
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        in_flight = 0 if num_workers == 0 else num_workers * (prefetch_factor if prefetch_factor else 2)
        steps_ahead = (num_microbatches - 1 + in_flight) // num_microbatches
        if steps_ahead > self.config.lag:
            raise ValueError(
                f"data loader prefetch ({num_workers} workers x prefetch factor {prefetch_factor or 2} = "
                f"{in_flight} micro-batches, {num_microbatches} micro-batches per step) reaches "
                f"{steps_ahead} steps ahead but the mixing lag is {self.config.lag}; "
                f"use --odm-lag {steps_ahead} or fewer workers/prefetch"
            )

    # -- sample order ----------------------------------------------------------------
    def global_batch(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        """(dataset ids, within-domain positions) of the ``global_batch_size`` samples of ``step``.

        Steps must be generated in order; a step already generated (and not yet completed) is
        returned again unchanged, so a re-created data loader iterator is harmless.
        """
        cached = self._lookahead.get(step)
        if cached is not None:
            return cached[0], cached[1]
        expected = self.completed_steps + len(self._lookahead)
        if step != expected:
            raise ValueError(
                f"global batch {step} requested out of order: the next one to generate is {expected} "
                f"({self.completed_steps} steps completed). Was the sampler built with the wrong consumed_samples?"
            )
        gbs = self.config.global_batch_size
        domains = assign_domains(self.config.seed, step * gbs, gbs, self.weights_for_step(step))
        positions = advance_cursors(self._lookahead_cursors, domains)
        self._lookahead[step] = (domains, positions, self._lookahead_cursors.copy())
        return domains, positions

    @property
    def cursors(self) -> np.ndarray:
        """Samples served per domain before the step being trained now."""
        return self._cursors.copy()

    # -- feedback --------------------------------------------------------------------
    def accumulate(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor, dataset_id: torch.Tensor) -> None:
        """Record one micro-batch's per-token losses by domain (on the device, no host sync)."""
        self.accumulator.add(per_token_loss, loss_mask, dataset_id)

    def step_end(self, step: int) -> Optional[UpdateRecord]:
        """Mark ``step`` trained; every ``update_interval`` steps, all-reduce and update the policy.

        Must be called on every rank after every optimizer step, with consecutive steps.
        """
        if step != self.completed_steps:
            raise ValueError(f"step_end({step}) out of order: expected step {self.completed_steps}")
        if step not in self._lookahead:  # ranks without a data loader still advance the cursors
            self.global_batch(step)
        _, _, cursors_after = self._lookahead.pop(step)
        self._cursors = cursors_after.copy()
        self.completed_steps += 1
        if self.completed_steps % self.config.update_interval != 0:
            self._window_at_step_end = self.accumulator.stats.clone()  # on the device: no sync
            return None
        return self._update(step)

    def _window_sampling_probs(self) -> np.ndarray:
        """The distribution that drew the window's samples: the weights of its steps, averaged."""
        n = self.config.update_interval
        steps = range(self.completed_steps - n, self.completed_steps)
        return np.mean([self.weights_for_step(s) for s in steps], axis=0)

    def _update(self, step: int) -> UpdateRecord:
        stats = self.reducer.all_reduce(self.accumulator.stats) + self._restored_window
        self.accumulator.reset()
        self._window_at_step_end = None
        self._restored_window[:] = 0
        mean_loss, tokens = mean_losses(stats)
        sampling_probs = self._window_sampling_probs()
        weights = self.policy.update(mean_loss, tokens, sampling_probs=sampling_probs)
        effective = self.completed_steps + self.config.lag
        self._schedule_steps.append(effective)
        self._schedule_weights.append(weights)
        self._prune_schedule()
        return UpdateRecord(
            step=step,
            update=self.policy.num_updates,
            effective_step=effective,
            weights=weights,
            mean_loss=mean_loss,
            token_counts=tokens,
            sampling_probs=sampling_probs,
        )

    def _prune_schedule(self) -> None:
        """Drop entries no step from the current window on can need."""
        oldest_needed = self.completed_steps - self.config.update_interval
        while len(self._schedule_steps) > 1 and self._schedule_steps[1] <= oldest_needed:
            del self._schedule_steps[0], self._schedule_weights[0]

    # -- state -----------------------------------------------------------------------
    def _completed_steps_window(self) -> torch.Tensor:
        """This rank's window sums from completed steps only.

        A checkpoint is taken between steps, but Megatron's rerun state machine saves in the middle
        of a suspicious step (after its forward-backward, before its step_end) and the next job
        re-runs that step from the checkpoint: its losses must not be in the saved window too."""
        completed = (self._window_at_step_end if self._window_at_step_end is not None
                     else torch.zeros_like(self.accumulator.stats))
        if not torch.equal(completed, self.accumulator.stats):
            logger.info("bandit state saved during step %d: that step's losses are left out of the "
                        "window (the step is re-run after a resume)", self.completed_steps)
        return completed

    def bandit_state(self) -> BanditState:
        """Snapshot for a checkpoint after ``completed_steps`` steps. Collective: sums the
        unfinished window over ranks."""
        window = self.reducer.all_reduce(self._completed_steps_window()) + self._restored_window
        return BanditState(
            domain_names=list(self.domain_names),
            seed=self.config.seed,
            num_samples_per_domain=self.num_samples_per_domain.tolist(),
            global_batch_size=self.config.global_batch_size,
            update_interval=self.config.update_interval,
            lag=self.config.lag,
            completed_steps=self.completed_steps,
            cursors=self._cursors.tolist(),
            schedule=[(s, w.tolist()) for s, w in zip(self._schedule_steps, self._schedule_weights)],
            partial_window=window.tolist(),
            policy=self.policy.state_dict(),
        )

    def state_dict(self) -> Dict[str, Any]:
        """Plain-Python bandit state (collective, see :meth:`bandit_state`)."""
        return self.bandit_state().to_dict()

    def load_bandit_state(self, state: BanditState) -> None:
        state.check_matches(
            self.domain_names, self.config.seed, self.num_samples_per_domain.tolist(), self.config.global_batch_size
        )
        if state.policy.get("name") != self.policy.name:
            raise BanditStateError(
                f"bandit state was made with policy {state.policy.get('name')!r}, this run uses {self.policy.name!r}"
            )
        for name in ("update_interval", "lag"):
            if getattr(state, name) != getattr(self.config, name):
                logger.warning(
                    "resuming with %s=%s (state has %s): the run will not match an uninterrupted one",
                    name, getattr(self.config, name), getattr(state, name),
                )
        self.policy.load_state_dict(state.policy)
        self.completed_steps = int(state.completed_steps)
        self._schedule_steps = [int(s) for s, _ in state.schedule]
        self._schedule_weights = [np.asarray(w, dtype=np.float64) for _, w in state.schedule]
        self._cursors = np.asarray(state.cursors, dtype=np.int64).copy()
        self._lookahead = {}
        self._lookahead_cursors = self._cursors.copy()
        self.accumulator.reset()
        self._window_at_step_end = None
        self._restored_window = np.asarray(state.partial_window, dtype=np.int64).reshape(NUM_STATS, -1).copy()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.load_bandit_state(BanditState.from_dict(state_dict))

    def save(self, path: str) -> None:
        """Write the bandit state to ``path`` (JSON). Collective; rank 0 writes."""
        state = self.bandit_state()
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            state.save(path)

    def load(self, path: str) -> None:
        self.load_bandit_state(BanditState.load(path))
