"""The bandit state: everything needed to continue an online-mixing run exactly.

One versioned, plain-Python object (lists, numbers, strings: safe for JSON and for
``torch.load(weights_only=True)``), holding the policy, the per-domain cursors, the weights
decided but not yet in force (the lag), the step counter and the partial window's loss
statistics, already summed over ranks at save time.

Every serialised state carries a ``sha256`` of its own content (canonical JSON: sorted keys, no
spaces), checked by :meth:`BanditState.from_dict` and :meth:`BanditState.load`: a bit flip in a
checkpoint or an edited file fails loudly instead of resuming with weights that no longer sum to
one. Version 1 states (before the checksum) are refused with a message; if you trust such a file,
``python -m odm_megatron.state stamp FILE`` rewrites it as version 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from odm_megatron.errors import CheckpointError

BANDIT_STATE_FORMAT = "odm-megatron-bandit-state"
BANDIT_STATE_VERSION = 2
CHECKSUM_KEY = "sha256"


class BanditStateError(CheckpointError, ValueError):
    """A bandit state that does not belong to this run, or is unreadable, corrupt or unverifiable.

    A :class:`~odm_megatron.errors.CheckpointError`; also a ``ValueError``, as it always was."""


def content_sha256(d: Dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``d`` without its checksum entry (plain data only)."""
    body = {k: v for k, v in d.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
        """Plain data (JSON- and ``weights_only``-safe) with its content checksum."""
        d = to_plain(asdict(self))
        d[CHECKSUM_KEY] = content_sha256(d)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: Optional[str] = None) -> "BanditState":
        """Verify (format, version, checksum) and build; ``source`` names the file in errors."""
        where = f"{source}: " if source else ""
        if not isinstance(d, dict) or d.get("format") != BANDIT_STATE_FORMAT:
            raise BanditStateError(f"{where}not an odm-megatron bandit state")
        if d.get("version") == 1 and CHECKSUM_KEY not in d:
            raise BanditStateError(
                f"{where}bandit state version 1 has no checksum, so its integrity cannot be checked; "
                f"if you trust the file, convert it with `python -m odm_megatron.state stamp FILE`"
            )
        if d.get("version") != BANDIT_STATE_VERSION:
            raise BanditStateError(
                f"{where}bandit state version {d.get('version')!r}; this odm-megatron reads {BANDIT_STATE_VERSION}"
            )
        recorded = d.get(CHECKSUM_KEY)
        if not isinstance(recorded, str):
            raise BanditStateError(f"{where}bandit state has no {CHECKSUM_KEY} checksum: refusing to trust it")
        try:
            actual = content_sha256(d)
        except (TypeError, ValueError) as e:  # not plain data
            raise BanditStateError(f"{where}malformed bandit state: {e}") from None
        if actual != recorded:
            raise BanditStateError(
                f"{where}bandit state checksum mismatch (recorded {recorded[:12]}..., content {actual[:12]}...): "
                "the state is corrupt or was edited"
            )
        try:
            return cls(**{k: v for k, v in d.items() if k != CHECKSUM_KEY})
        except TypeError as e:
            raise BanditStateError(f"{where}malformed bandit state: {e}") from None

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
        """Read and verify a JSON state (never executes anything: JSON only)."""
        d = _read_json(path)
        return cls.from_dict(d, source=path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BanditStateError(f"bandit state not found: {path}") from None
    except OSError as e:
        raise BanditStateError(f"{path}: cannot read the bandit state ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError (a flipped byte)
        raise BanditStateError(f"{path}: not a valid bandit state file ({type(e).__name__}: {e})") from None


def stamp(path: str) -> None:
    """Rewrite a trusted version-1 state file (no checksum) as a verified version-2 file."""
    d = _read_json(path)
    if not isinstance(d, dict) or d.get("format") != BANDIT_STATE_FORMAT:
        raise BanditStateError(f"{path}: not an odm-megatron bandit state")
    if d.get("version") not in (1, BANDIT_STATE_VERSION):
        raise BanditStateError(f"{path}: bandit state version {d.get('version')!r} cannot be stamped")
    body = {k: v for k, v in d.items() if k != CHECKSUM_KEY}
    body["version"] = BANDIT_STATE_VERSION
    try:
        state = BanditState(**body)
    except TypeError as e:
        raise BanditStateError(f"{path}: malformed bandit state: {e}") from None
    state.save(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m odm_megatron.state",
                                     description="Maintenance of bandit state files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stamp", help="add the checksum to a version-1 state file you trust (in place)")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("verify", help="check state files (format, version, checksum)")
    p.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            if args.command == "stamp":
                stamp(path)
            BanditState.load(path)
            print(f"{path}: ok")
        except BanditStateError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

