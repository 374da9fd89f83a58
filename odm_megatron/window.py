"""The feedback window: the per-domain losses of the steps since the last policy update.

Micro-batch losses accumulate on the device (:class:`~odm_megatron.feedback.DomainLossAccumulator`,
no host sync); when the window closes, one all-reduce (:class:`~odm_megatron.distributed.FeedbackReducer`)
gives every rank the same integer totals. A checkpoint taken inside a window stores the window's
totals so far (summed over ranks), and a resumed run adds them back when the window closes.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch

from odm_megatron.distributed import FeedbackReducer
from odm_megatron.feedback import NUM_STATS, DomainLossAccumulator

logger = logging.getLogger(__name__)


class FeedbackWindow:
    """Loss statistics of the steps ``start .. `` (the open window), on this rank and restored."""

    def __init__(self, num_domains: int, device: Optional[Union[str, torch.device]] = None,
                 reducer: Optional[FeedbackReducer] = None) -> None:
        self.accumulator = DomainLossAccumulator(num_domains, device)
        self.reducer = reducer if reducer is not None else FeedbackReducer()
        self.start = 0
        """The first step of the open window."""
        self._restored = np.zeros((NUM_STATS, num_domains), dtype=np.int64)  # from a checkpoint, all ranks
        # this rank's sums as of the last completed step; None: no step completed in this window
        self._at_step_end: Optional[torch.Tensor] = None

    def add(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor, dataset_id: torch.Tensor) -> None:
        """One micro-batch's per-token losses by domain (on the device, no host sync)."""
        self.accumulator.add(per_token_loss, loss_mask, dataset_id)

    def step_done(self) -> None:
        """Mark the losses so far as belonging to completed steps (a device copy, no sync)."""
        self._at_step_end = self.accumulator.stats.clone()

    def close(self, next_start: int) -> np.ndarray:
        """Collective: the window's totals over all ranks (restored part included); opens the next
        window at step ``next_start``."""
        totals = self.reducer.all_reduce(self.accumulator.stats) + self._restored
        self.accumulator.reset()
        self._at_step_end = None
        self._restored[:] = 0
        self.start = next_start
        return totals

    def completed_totals(self, completed_steps: int) -> np.ndarray:
        """Collective: the totals of the window's *completed* steps over all ranks, for a checkpoint
        after ``completed_steps`` steps.

        A checkpoint is taken between steps, but Megatron's rerun state machine saves in the middle
        of a suspicious step (after its forward-backward, before its step_end) and the next job
        re-runs that step from the checkpoint: its losses must not be in the saved window too."""
        completed = self._at_step_end if self._at_step_end is not None else torch.zeros_like(self.accumulator.stats)
        if not torch.equal(completed, self.accumulator.stats):
            logger.info("bandit state saved during step %d: that step's losses are left out of the "
                        "window (the step is re-run after a resume)", completed_steps)
        return self.reducer.all_reduce(completed) + self._restored

    def restore(self, start: int, totals: np.ndarray) -> None:
        """Continue a window that began at step ``start`` with ``totals`` from a checkpoint."""
        self.accumulator.reset()
        self._at_step_end = None
        self._restored = np.asarray(totals, dtype=np.int64).reshape(NUM_STATS, -1).copy()
        self.start = int(start)
