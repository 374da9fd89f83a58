"""The lagged weight schedule: which weights sample each training step.

Weights decided by the policy update after step ``s`` take effect at step ``s + 1 + lag``, so at
any moment a few decisions are made but not yet in force. The schedule holds them as
``(effective step, weights)`` entries, oldest first; an entry is in force from its step until
the next entry's step. Pure bookkeeping in numpy: no ranks, no devices.
"""
from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple

import numpy as np


class WeightSchedule:
    """``(effective step, weights)`` entries in step order; the first is in force from step 0."""

    def __init__(self, initial_weights: np.ndarray) -> None:
        self._steps: List[int] = [0]
        self._weights: List[np.ndarray] = [np.asarray(initial_weights, dtype=np.float64).copy()]

    @classmethod
    def from_entries(cls, entries: Sequence[Tuple[int, Sequence[float]]]) -> "WeightSchedule":
        """Rebuild from :meth:`entries` (a checkpoint's ``schedule``)."""
        if not entries:
            raise ValueError("a weight schedule needs at least one entry")
        schedule = cls(np.asarray(entries[0][1], dtype=np.float64))
        schedule._steps = [int(s) for s, _ in entries]
        schedule._weights = [np.asarray(w, dtype=np.float64).copy() for _, w in entries]
        if any(a > b for a, b in zip(schedule._steps, schedule._steps[1:])):
            raise ValueError(f"weight schedule steps are not in order: {schedule._steps}")
        return schedule

    def entries(self) -> List[Tuple[int, List[float]]]:
        """Plain-Python entries, oldest first (what a checkpoint stores)."""
        return [(s, w.tolist()) for s, w in zip(self._steps, self._weights)]

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def earliest_step(self) -> int:
        """The first step whose weights are still known."""
        return self._steps[0]

    @property
    def last_decision_step(self) -> int:
        """The effective step of the newest entry (0: no decision since the initial weights)."""
        return self._steps[-1]

    @property
    def latest(self) -> np.ndarray:
        """The most recently decided weights (possibly not in force yet)."""
        return self._weights[-1].copy()

    def weights_for(self, step: int) -> np.ndarray:
        """The weights in force at ``step`` (a copy)."""
        if step < self._steps[0]:
            raise ValueError(f"weights for step {step} were discarded (earliest kept: {self._steps[0]})")
        i = bisect.bisect_right(self._steps, step) - 1
        return self._weights[i].copy()

    def mean_over(self, start: int, stop: int) -> np.ndarray:
        """The average of the weights in force at steps ``start .. stop - 1``: the distribution that
        drew a window's samples (the importance weights of its losses)."""
        if stop <= start:
            raise ValueError(f"empty step range [{start}, {stop})")
        return np.mean([self.weights_for(s) for s in range(start, stop)], axis=0)

    def decide(self, effective_step: int, weights: np.ndarray) -> None:
        """Add weights in force from ``effective_step`` on.

        In a run with a fixed lag every decision lands after the previous one. After a resume with
        a shorter lag a decision can land at or before one made earlier under the longer lag; the
        newer decision wins from its step on (no step at or after it has been sampled yet: the
        prefetch guard sees to that)."""
        i = bisect.bisect_left(self._steps, effective_step)
        if i == 0:
            raise ValueError(f"a decision for step {effective_step} would replace the weights in force "
                             f"before it (earliest kept: step {self._steps[0]})")
        del self._steps[i:], self._weights[i:]
        self._steps.append(int(effective_step))
        self._weights.append(np.asarray(weights, dtype=np.float64).copy())

    def forget_before(self, step: int) -> None:
        """Drop entries that no step from ``step`` on can need (the one in force at ``step`` stays)."""
        while len(self._steps) > 1 and self._steps[1] <= step:
            del self._steps[0], self._weights[0]
