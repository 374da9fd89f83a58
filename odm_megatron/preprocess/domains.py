"""Domain routing: which domain a document belongs to, and a safe file name for it.

The domain is read from a dotted key (The Pile: ``meta.pile_set_name``; ``meta.source`` and
plain ``source`` work the same way). Domain names become file-name stems that are safe on any
file system: ``Wikipedia (en)`` -> ``Wikipedia_en``, ``Gutenberg (PG-19)`` -> ``Gutenberg_PG-19``,
``Pile-CC`` stays. Two names that clean to the same stem (also ignoring case, for case-insensitive
file systems) would write into the same shard, so that is an error rather than a silent merge.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

SHARD_SUFFIX = "_text_document"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 100


class DomainError(ValueError):
    """Domain names that cannot be turned into distinct file names."""


@dataclass(frozen=True)
class DomainKey:
    """A dotted path into a JSON object, e.g. ``meta.pile_set_name``."""

    dotted: str
    parts: Tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = tuple(self.dotted.split("."))
        if not self.dotted or any(not p for p in parts):
            raise ValueError(f"domain key {self.dotted!r} must be a dotted path such as meta.pile_set_name")
        object.__setattr__(self, "parts", parts)

    def lookup(self, obj: Any) -> Any:
        """The value at the key, or ``None`` when any step is missing or not an object."""
        for part in self.parts:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(part)
            if obj is None:
                return None
        return obj


def safe_name(name: str) -> str:
    """A file-name stem for a domain: ASCII letters, digits, ``.``, ``_`` and ``-`` only.

    Runs of anything else become one ``_``; leading/trailing ``_ . -`` are dropped (no hidden
    files, no ``..``). A name with nothing left, or too long, gets a short hash so it stays unique.
    """
    stem = _UNSAFE.sub("_", name).strip("_.-")
    if not stem or len(stem) > _MAX_STEM:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        stem = f"{stem[:_MAX_STEM - 11]}_{digest}" if stem else f"domain_{digest}"
    return stem


def shard_prefix(name: str) -> str:
    """``Wikipedia (en)`` -> ``Wikipedia_en_text_document`` (Megatron's usual suffix)."""
    return safe_name(name) + SHARD_SUFFIX


@dataclass
class DomainRegistry:
    """Domain name -> shard prefix, refusing names that would share a file."""

    _prefixes: Dict[str, str] = field(default_factory=dict)
    _owners: Dict[str, str] = field(default_factory=dict)  # casefolded prefix -> domain name

    def prefix(self, name: str) -> str:
        prefix = self._prefixes.get(name)
        if prefix is not None:
            return prefix
        prefix = shard_prefix(name)
        owner = self._owners.get(prefix.casefold())
        if owner is not None:
            raise DomainError(
                f"domains {owner!r} and {name!r} both map to the file name {prefix!r}; "
                "rename one of them in the input (or pick another --domain-key)"
            )
        self._owners[prefix.casefold()] = name
        self._prefixes[name] = prefix
        return prefix

    def __contains__(self, name: str) -> bool:
        return name in self._prefixes

    def __len__(self) -> int:
        return len(self._prefixes)
