"""The bandit state: everything needed to continue an online-mixing run exactly.

One versioned, plain-Python object (lists, numbers, strings: safe for JSON and for
``torch.load(weights_only=True)``), holding the policy, the per-domain cursors, the weights
decided but not yet in force (the lag), the step counter and the partial window's loss
statistics, already summed over ranks at save time.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np

BANDIT_STATE_FORMAT = "odm-megatron-bandit-state"
BANDIT_STATE_VERSION = 1


class BanditStateError(ValueError):
    """A bandit state that does not belong to this run (or is unreadable)."""


def to_plain(value: Any) -> Any:
    """numpy containers and scalars -> lists and Python numbers, recursively."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


@dataclass
class BanditState:
    domain_names: List[str]
    seed: int
    num_samples_per_domain: List[int]
    global_batch_size: int
    update_interval: int
    lag: int
    completed_steps: int
    cursors: List[int]
    schedule: List[Tuple[int, List[float]]]  # (effective step, weights), oldest first
    partial_window: List[List[int]]  # [3][K] int64 statistics of the unfinished window, all ranks
    policy: Dict[str, Any] = field(default_factory=dict)
    format: str = BANDIT_STATE_FORMAT
    version: int = BANDIT_STATE_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return to_plain(asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BanditState":
        if not isinstance(d, dict) or d.get("format") != BANDIT_STATE_FORMAT:
            raise BanditStateError("not an odm-megatron bandit state")
        if d.get("version") != BANDIT_STATE_VERSION:
            raise BanditStateError(
                f"bandit state version {d.get('version')!r}; this odm-megatron reads {BANDIT_STATE_VERSION}"
            )
        try:
            return cls(**d)
        except TypeError as e:
            raise BanditStateError(f"malformed bandit state: {e}") from None

    def check_matches(
        self, domain_names: List[str], seed: int, num_samples_per_domain: List[int], global_batch_size: int
    ) -> None:
        """Raise :class:`BanditStateError` naming the first difference with this run."""
        if list(self.domain_names) != list(domain_names):
            missing = [n for n in self.domain_names if n not in domain_names]
            extra = [n for n in domain_names if n not in self.domain_names]
            detail = []
            if missing:
                detail.append(f"in the state but not in this run: {missing}")
            if extra:
                detail.append(f"in this run but not in the state: {extra}")
            if not detail:
                detail.append(f"same names in another order: state {self.domain_names}, run {list(domain_names)}")
            raise BanditStateError("bandit state is for a different domain list (" + "; ".join(detail) + ")")
        if int(self.seed) != int(seed):
            raise BanditStateError(f"bandit state was made with seed {self.seed}, this run uses seed {seed}")
        if [int(n) for n in self.num_samples_per_domain] != [int(n) for n in num_samples_per_domain]:
            diffs = [
                f"{name}: state {a}, run {b}"
                for name, a, b in zip(self.domain_names, self.num_samples_per_domain, num_samples_per_domain)
                if int(a) != int(b)
            ]
            raise BanditStateError(
                "bandit state was made with datasets of other sizes (samples per domain differ: "
                + "; ".join(diffs) + "); were the shards or the sequence length changed?"
            )
        if int(self.global_batch_size) != int(global_batch_size):
            raise BanditStateError(
                f"bandit state was made with global batch size {self.global_batch_size}, "
                f"this run uses {global_batch_size}"
            )

    def save(self, path: str) -> None:
        """Write as JSON, atomically (temporary file + rename)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bandit-state-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> "BanditState":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise BanditStateError(f"bandit state not found: {path}") from None
        except json.JSONDecodeError as e:
            raise BanditStateError(f"{path}: not a valid bandit state file ({e})") from None
        return cls.from_dict(d)

