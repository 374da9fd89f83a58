"""One line for an output that cannot be written: which path, why, and what to do.

``preprocess`` (``--output-dir``) and ``train`` (``--save``, ``--log-dir``) meet the same
failures (a file where a directory should be, a read-only file system, a full disk or quota);
they turn the ``OSError`` into this message instead of a traceback.
"""
from __future__ import annotations

import errno

_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another"),
    errno.EROFS: ("read-only file system", "choose a writable"),
    errno.EACCES: ("permission denied", "choose a writable"),
    errno.EPERM: ("operation not permitted", "choose a writable"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another"),
    errno.EEXIST: ("exists and is not a directory", "choose another"),
    errno.EISDIR: ("is a directory", "choose another"),
}

WRITE_ERRNOS = frozenset(_REASONS)


def is_write_error(e: BaseException) -> bool:
    """An ``OSError`` that means "this output location cannot take the data"."""
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def describe_write_error(e: OSError, path: str, flag: str) -> str:
    """``cannot write PATH: REASON; FIX FLAG`` (``flag`` e.g. ``--output-dir``)."""
    reason, fix = _REASONS.get(e.errno, (e.strerror or str(e), "check or choose another"))
    return f"cannot write {path}: {reason}; {fix} {flag}"
