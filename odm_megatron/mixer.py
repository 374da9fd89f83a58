"""The online mixer: one coordinator over the policy and three small pieces.

- :class:`~odm_megatron.schedule.WeightSchedule`: the weights in force at each step (the lag);
- :class:`~odm_megatron.stream.SampleStream`: the domain cursors and the steps the data loader
  has drawn ahead of training;
- :class:`~odm_megatron.window.FeedbackWindow`: the losses since the last policy update and the
  one all-reduce that closes the window;
- the policy (:mod:`odm_megatron.policy`): pure numpy, losses in, weights out.

Protocol, identical on every rank::

    for step in range(start, train_iters):
        for micro_batch in loader:                  # sampler -> mixer.draw_global_batch(step)
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

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from odm_megatron.config import DEFAULT_LAG, DEFAULT_UPDATE_INTERVAL, check_schedule
from odm_megatron.distributed import FeedbackReducer, is_writing_rank
from odm_megatron.feedback import DomainLossAccumulator, mean_losses, observed_tokens
from odm_megatron.policy import DEFAULT_POLICY, make_policy
from odm_megatron.schedule import WeightSchedule
from odm_megatron.state import BanditState, BanditStateError
from odm_megatron.stream import Batch, SampleStream, validate_prefetch
from odm_megatron.window import FeedbackWindow

logger = logging.getLogger(__name__)


class PrefetchTooDeepError(RuntimeError):
    """The data loader asked for a step whose weights are not decided yet."""


@dataclass
class MixerConfig:
    domain_names: List[str]
    seed: int
    global_batch_size: int
    update_interval: int = DEFAULT_UPDATE_INTERVAL
    """Steps between policy updates (one all-reduce each)."""
    lag: int = DEFAULT_LAG
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
        check_schedule(self.policy, self.update_interval, self.lag)  # the rules OdmConfig applies (a ValueError)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)


@dataclass
class UpdateRecord:
    """What one policy update saw and decided (one line of mixture.jsonl).

    The fields count steps from 0, as the mixer does (``step_end(0)`` ends the first step);
    :meth:`to_json` writes them 1-based, as Megatron numbers iterations, so that every
    ``mixture.jsonl`` (the trainer's, the Megatron-LM and DeepSpeed glue's) reads the same.
    """

    step: int  # the last step of the window (0-based)
    update: int  # 1-based update counter
    effective_step: int  # first step sampled with ``weights`` (0-based)
    weights: np.ndarray
    mean_loss: np.ndarray  # nan where not observed
    token_counts: np.ndarray
    sampling_probs: np.ndarray  # the distribution that drew the window's samples

    def to_json(self, domain_names: List[str]) -> Dict[str, Any]:
        """One mixture.jsonl line; ``step`` and ``effective_step`` 1-based (iteration numbers)."""
        def by_name(values, cast):
            return {n: cast(v) for n, v in zip(domain_names, values)}

        return {
            "step": self.step + 1,
            "update": self.update,
            "effective_step": self.effective_step + 1,
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
        self.schedule = WeightSchedule(self.policy.weights())
        self.stream = SampleStream(config.seed, config.global_batch_size, k, self.weights_for_step)
        self.window = FeedbackWindow(k, device, reducer)

    @property
    def domain_names(self) -> List[str]:
        return self.config.domain_names

    @property
    def completed_steps(self) -> int:
        """Steps trained (``step_end`` called) so far."""
        return self.stream.completed_steps

    @property
    def accumulator(self) -> DomainLossAccumulator:
        """The open window's device-side loss statistics."""
        return self.window.accumulator

    @property
    def reducer(self) -> FeedbackReducer:
        return self.window.reducer

    # -- weights ---------------------------------------------------------------------
    @property
    def current_weights(self) -> np.ndarray:
        """The weights of the step being trained now."""
        return self.weights_for_step(self.completed_steps)

    @property
    def latest_weights(self) -> np.ndarray:
        """The most recently decided weights (possibly not in force yet, because of the lag)."""
        return self.schedule.latest

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
        return self.schedule.weights_for(step)

    def validate_prefetch(self, num_workers: int, prefetch_factor: Optional[int], num_microbatches: int) -> None:
        """Raise ValueError if a DataLoader so configured would outrun the lag (see
        :func:`~odm_megatron.stream.prefetch_steps_ahead`)."""
        validate_prefetch(num_workers, prefetch_factor, num_microbatches, self.config.lag)

    # -- sample order ----------------------------------------------------------------
    def draw_global_batch(self, step: int) -> Batch:
        """(dataset ids, within-domain positions) of the ``global_batch_size`` samples of ``step``.

        Draws the step if it is the next one not drawn (advancing the look-ahead cursors); a step
        drawn and not yet completed is returned again unchanged. Steps are drawn in order, so a
        data-loader iterator re-created after any ``step_end`` fails with "out of order": build a
        new sampler from :attr:`completed_steps` instead (see :meth:`SampleStream.draw`).
        """
        return self.stream.draw(step)

    global_batch = draw_global_batch  # the earlier name (benchmarks, older callers)

    @property
    def cursors(self) -> np.ndarray:
        """Samples served per domain before the step being trained now."""
        return self.stream.cursors

    # -- feedback --------------------------------------------------------------------
    def accumulate(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor, dataset_id: torch.Tensor) -> None:
        """Record one micro-batch's per-token losses by domain (on the device, no host sync)."""
        self.window.add(per_token_loss, loss_mask, dataset_id)

    def step_end(self, step: int) -> Optional[UpdateRecord]:
        """Mark ``step`` trained; every ``update_interval`` steps, all-reduce and update the policy.

        Must be called on every rank after every optimizer step, with consecutive steps.
        """
        self.stream.complete(step)
        if self.completed_steps - self.window.start < self.config.update_interval:
            self.window.step_done()
            return None
        return self._update(step)

    def _update(self, step: int) -> UpdateRecord:
        window_start, completed = self.window.start, self.completed_steps
        stats = self.window.close(next_start=completed)
        mean_loss, tokens = mean_losses(stats)
        sampling_probs = self.schedule.mean_over(window_start, completed)
        # observed_tokens: a domain with only non-finite losses is skipped with the policy's warning
        weights = self.policy.update(mean_loss, observed_tokens(stats), sampling_probs=sampling_probs)
        effective = completed + self.config.lag
        self.schedule.decide(effective, weights)
        self.schedule.forget_before(completed)  # the next window's first step on
        return UpdateRecord(
            step=step,
            update=self.policy.num_updates,
            effective_step=effective,
            weights=weights,
            mean_loss=mean_loss,
            token_counts=tokens,
            sampling_probs=sampling_probs,
        )

    # -- state -----------------------------------------------------------------------
    def bandit_state(self) -> BanditState:
        """Snapshot for a checkpoint after ``completed_steps`` steps. Collective: sums the
        unfinished window over ranks."""
        window = self.window.completed_totals(self.completed_steps)
        return BanditState(
            domain_names=list(self.domain_names),
            seed=self.config.seed,
            num_samples_per_domain=self.num_samples_per_domain.tolist(),
            global_batch_size=self.config.global_batch_size,
            update_interval=self.config.update_interval,
            lag=self.config.lag,
            completed_steps=self.completed_steps,
            cursors=self.stream.cursors.tolist(),
            schedule=self.schedule.entries(),
            partial_window=window.tolist(),
            policy=self.policy.state_dict(),
        )

    def state_dict(self) -> Dict[str, Any]:
        """Plain-Python bandit state (collective, see :meth:`bandit_state`)."""
        return self.bandit_state().to_dict()

    def load_bandit_state(self, state: BanditState) -> None:
        """Continue from ``state``. The update interval and the lag may differ from the state's
        (a warning says the run will no longer match an uninterrupted one): the open window keeps
        its start and closes ``update_interval`` steps after it, and the weights already decided
        keep their steps."""
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
        completed = int(state.completed_steps)
        schedule = WeightSchedule.from_entries(state.schedule)
        self.policy.load_state_dict(state.policy)
        self.schedule = schedule
        self.stream.restore(completed, np.asarray(state.cursors, dtype=np.int64))
        self.window.restore(_window_start(schedule, int(state.lag), completed), state.partial_window)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.load_bandit_state(BanditState.from_dict(state_dict))

    def save(self, path: str) -> None:
        """Write the bandit state to ``path`` (JSON). Collective; rank 0 writes."""
        state = self.bandit_state()
        if is_writing_rank():
            state.save(path)

    def load(self, path: str) -> None:
        self.load_bandit_state(BanditState.load(path))


def _window_start(schedule: WeightSchedule, lag: int, completed_steps: int) -> int:
    """The first step of a checkpoint's open window: the step of the last policy update.

    That update's weights are the schedule's newest entry, in force from ``update step + lag``
    (``lag`` of the run that saved); the initial entry (step 0) means no update yet. Exact unless
    the lag was changed at a resume and the state saved before the next update; the result is
    kept where the schedule still knows the weights, so the window's sampling probabilities can
    always be computed."""
    last = schedule.last_decision_step
    start = 0 if last == 0 else last - lag
    return min(max(start, schedule.earliest_step, 0), completed_steps)
