"""The sample stream: which ``(domain, position)`` keys each global batch holds.

Global batch ``step`` holds global samples ``[step * gbs, (step + 1) * gbs)``; their domains come
from :func:`~odm_megatron.sampling.assign_domains` with the weights in force at ``step``, their
positions from the domains' cursors. The data loader draws steps ahead of training (prefetch), so
the stream keeps two sets of cursors: the committed ones (at the start of the first step not yet
trained) and the look-ahead ones (after the last step drawn), plus the drawn steps themselves
until training completes them. A step is drawn once: asking again for a drawn step returns the
same keys, so the training loop, the sampler and ranks without a data loader all see one draw.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np

from odm_megatron.sampling import advance_cursors, assign_domains

Batch = Tuple[np.ndarray, np.ndarray]  # (dataset ids, within-domain positions), int64 each


class SampleStream:
    """Domain cursors and the steps drawn ahead of training.

    ``weights_for_step(step)`` gives the weights that sample ``step`` (it may refuse a step whose
    weights are not decided yet: see :class:`~odm_megatron.mixer.PrefetchTooDeepError`).
    """

    def __init__(self, seed: int, global_batch_size: int, num_domains: int,
                 weights_for_step: Callable[[int], np.ndarray]) -> None:
        self.seed = seed
        self.global_batch_size = global_batch_size
        self._weights_for_step = weights_for_step
        self.completed_steps = 0
        """Steps trained and committed; the committed cursors are at the start of this step."""
        self._cursors = np.zeros(num_domains, dtype=np.int64)
        # drawn, not yet completed: step -> (domains, positions, cursors after the step)
        self._drawn: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._lookahead_cursors = self._cursors.copy()

    @property
    def cursors(self) -> np.ndarray:
        """Samples served per domain before step :attr:`completed_steps` (a copy)."""
        return self._cursors.copy()

    @property
    def steps_drawn_ahead(self) -> int:
        """Steps drawn by the data loader and not completed yet."""
        return len(self._drawn)

    @property
    def next_step_to_draw(self) -> int:
        return self.completed_steps + len(self._drawn)

    def draw(self, step: int) -> Batch:
        """The keys of global batch ``step``: drawn now if ``step`` is the next undrawn step (this
        advances the look-ahead cursors), or the earlier draw if ``step`` is drawn and not completed.

        Any other step raises: steps are drawn in order, once. In particular a *new* data-loader
        iterator over a sampler built for an earlier ``consumed_samples`` fails here as soon as a
        step has completed; build a new sampler from the mixer's completed steps instead.
        """
        drawn = self._drawn.get(step)
        if drawn is not None:
            return drawn[0], drawn[1]
        expected = self.next_step_to_draw
        if step != expected:
            raise ValueError(
                f"global batch {step} requested out of order: the next one to generate is {expected} "
                f"({self.completed_steps} steps completed). Was the sampler built with the wrong "
                f"consumed_samples, or a data-loader iterator re-created after training began? (A new "
                f"sampler must start at the completed steps x the global batch size.)"
            )
        gbs = self.global_batch_size
        domains = assign_domains(self.seed, step * gbs, gbs, self._weights_for_step(step))
        positions = advance_cursors(self._lookahead_cursors, domains)
        self._drawn[step] = (domains, positions, self._lookahead_cursors.copy())
        return domains, positions

    def complete(self, step: int) -> None:
        """Commit ``step``'s samples as trained (drawing it first on ranks without a data loader)."""
        if step != self.completed_steps:
            raise ValueError(f"step_end({step}) out of order: expected step {self.completed_steps}")
        if step not in self._drawn:
            self.draw(step)
        _, _, cursors_after = self._drawn.pop(step)
        self._cursors = cursors_after.copy()
        self.completed_steps += 1

    def restore(self, completed_steps: int, cursors: np.ndarray) -> None:
        """Continue from a checkpoint: nothing drawn ahead, cursors at ``completed_steps``."""
        self.completed_steps = int(completed_steps)
        self._cursors = np.asarray(cursors, dtype=np.int64).copy()
        self._drawn = {}
        self._lookahead_cursors = self._cursors.copy()


def prefetch_steps_ahead(num_workers: int, prefetch_factor: Optional[int], num_microbatches: int) -> int:
    """How many steps ahead of the one training a DataLoader so configured asks for.

    While step s trains its last micro-batch, a loader with ``num_workers * prefetch_factor``
    batches in flight asks for micro-batch ``(s+1)*A - 1 + P``, i.e. step ``s + (A - 1 + P) // A``.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    in_flight = 0 if num_workers == 0 else num_workers * (prefetch_factor if prefetch_factor else 2)
    return (num_microbatches - 1 + in_flight) // num_microbatches


def validate_prefetch(num_workers: int, prefetch_factor: Optional[int], num_microbatches: int, lag: int) -> None:
    """Raise ValueError if a DataLoader so configured would ask for steps beyond the lag."""
    steps_ahead = prefetch_steps_ahead(num_workers, prefetch_factor, num_microbatches)
    if steps_ahead > lag:
        in_flight = 0 if num_workers == 0 else num_workers * (prefetch_factor or 2)
        raise ValueError(
            f"data loader prefetch ({num_workers} workers x prefetch factor {prefetch_factor or 2} = "
            f"{in_flight} micro-batches, {num_microbatches} micro-batches per step) reaches "
            f"{steps_ahead} steps ahead but the mixing lag is {lag}; "
            f"use --odm-lag {steps_ahead} or fewer workers/prefetch"
        )
