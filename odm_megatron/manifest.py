"""The data description that ``odm-megatron preprocess`` writes and ``odm-megatron train`` reads.

``DIR/manifest.json`` names, for each domain, its Megatron indexed-dataset prefix (relative to
the manifest's directory) and its size, plus the tokenizer the shards were made with. The
natural prior (weights proportional to tokens, as The Pile's sampling roughly is) comes from it.

Each domain also records what its shard must look like (``bin_bytes``, ``idx_bytes``,
``idx_sha256``, ``max_token_id``), so that ``train`` can refuse, before building anything, a
truncated ``.bin``, another domain's ``.idx``, a re-made ``.idx`` over an old ``.bin`` or ids
beyond the vocabulary (:meth:`Manifest.verify_shards`). Only the ``.idx`` is hashed (it is small);
the ``.bin`` is checked by size. Manifests written before these fields get a warning instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "odm-megatron-manifest"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent."""


class ShardCheckError(ManifestError):
    """A shard on disk that is not the one the manifest describes."""


SHARD_RECORD_FIELDS = ("bin_bytes", "idx_bytes", "idx_sha256", "max_token_id")

_SHA256_MEMO: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) so one process hashes it once
    (the shard check and the content-keyed index cache both need it)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _SHA256_MEMO.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _SHA256_MEMO[key] = h.hexdigest()
    return digest


def shard_record(prefix: str, max_token_id: Optional[int] = None) -> Dict[str, Any]:
    """The manifest fields that pin down ``prefix``.bin/.idx; ``max_token_id`` is read from the
    .bin when not given (``preprocess`` passes the one it tracked while writing)."""
    if max_token_id is None:
        max_token_id = _scan_max_token_id(prefix)
    return {"bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx"),
            "idx_sha256": file_sha256(prefix + ".idx"), "max_token_id": int(max_token_id)}


def _scan_max_token_id(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    data = np.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")
    return int(data.max()) if data.size else -1


@dataclass
class DomainEntry:
    name: str
    prefix: str  # absolute path prefix of <prefix>.bin / <prefix>.idx
    documents: int
    tokens: int
    bin_bytes: Optional[int] = None
    idx_bytes: Optional[int] = None
    idx_sha256: Optional[str] = None
    max_token_id: Optional[int] = None

    @property
    def has_shard_record(self) -> bool:
        return None not in (self.bin_bytes, self.idx_bytes, self.idx_sha256, self.max_token_id)

    def verify_shard(self, vocab_size: int) -> None:
        """Raise :class:`ShardCheckError` (one line naming the shard) unless the files on disk are
        the ones recorded and every id fits the vocabulary. Needs :attr:`has_shard_record`."""
        what = f"domain {self.name!r}: shard {self.prefix}"
        fix = "re-run `odm-megatron preprocess` or restore the files the manifest was written with"
        for ext, want in ((".bin", self.bin_bytes), (".idx", self.idx_bytes)):
            path = self.prefix + ext
            if not os.path.isfile(path):
                raise ShardCheckError(f"{what}: {path} is missing; {fix}")
            size = os.path.getsize(path)
            if size != want:
                how = "truncated" if size < want else "longer than recorded"
                raise ShardCheckError(f"{what}: {path} is {size:,} bytes, the manifest records {want:,} "
                                      f"({how}: not the file preprocess wrote); {fix}")
        digest = file_sha256(self.prefix + ".idx")
        if digest != self.idx_sha256:
            raise ShardCheckError(f"{what}: {self.prefix}.idx has sha256 {digest[:16]}..., the manifest records "
                                  f"{self.idx_sha256[:16]}... (another shard's index, or a re-made one); {fix}")
        if self.max_token_id >= vocab_size:
            raise ShardCheckError(f"{what}: holds token id {self.max_token_id}, beyond the vocabulary of "
                                  f"{vocab_size} ids; it was tokenized with another tokenizer than the manifest "
                                  f"names")


@dataclass
class TokenizerEntry:
    path: str
    type: str  # "sentencepiece" | "huggingface"
    vocab_size: int
    eod_id: int
    sha256: Optional[str] = None


@dataclass
class Manifest:
    path: str
    domains: List[DomainEntry]
    tokenizer: TokenizerEntry
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def domain_names(self) -> List[str]:
        return [d.name for d in self.domains]

    @property
    def prefixes(self) -> List[str]:
        return [d.prefix for d in self.domains]

    def natural_prior(self) -> np.ndarray:
        """Weights proportional to each domain's token count."""
        tokens = np.array([d.tokens for d in self.domains], dtype=np.float64)
        if tokens.sum() <= 0:
            raise ManifestError(f"{self.path}: every domain has zero tokens")
        return tokens / tokens.sum()

    @classmethod
    def load(cls, path: str) -> "Manifest":
        if os.path.isdir(path):
            path = os.path.join(path, "manifest.json")
        if not os.path.isfile(path):
            raise ManifestError(f"manifest not found: {path} (make one with `odm-megatron preprocess`)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if raw.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path}: not an odm-megatron manifest (format={raw.get('format')!r})")
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{path}: manifest version {raw.get('version')!r}, this odm-megatron reads {MANIFEST_VERSION}"
            )
        base = os.path.dirname(os.path.abspath(path))
        try:
            domains = [
                DomainEntry(
                    name=str(d["name"]),
                    prefix=os.path.normpath(os.path.join(base, d["prefix"])),
                    documents=int(d["documents"]),
                    tokens=int(d["tokens"]),
                    **{k: (str(d[k]) if k == "idx_sha256" else int(d[k])) for k in SHARD_RECORD_FIELDS
                       if d.get(k) is not None},
                )
                for d in raw["domains"]
            ]
            t = raw["tokenizer"]
            tok_path = t["path"] if os.path.isabs(t["path"]) else os.path.normpath(os.path.join(base, t["path"]))
            tokenizer = TokenizerEntry(
                path=tok_path,
                type=str(t.get("type", "sentencepiece")),
                vocab_size=int(t["vocab_size"]),
                eod_id=int(t["eod_id"]),
                sha256=t.get("sha256"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        if not domains:
            raise ManifestError(f"{path}: lists no domains")
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ManifestError(f"{path}: duplicate domain names {sorted(n for n in set(names) if names.count(n) > 1)}")
        return cls(path=path, domains=domains, tokenizer=tokenizer, raw=raw)

    def verify_shards(self) -> bool:
        """Check every shard against its record and the vocabulary (cheap: sizes, and a sha256 of
        each .idx). Raises :class:`ShardCheckError`; returns False, with a warning, when the
        manifest predates shard records and nothing could be checked."""
        unchecked = [d.name for d in self.domains if not d.has_shard_record]
        for d in self.domains:
            if d.has_shard_record:
                d.verify_shard(self.tokenizer.vocab_size)
        if unchecked:
            logger.warning("%s: no shard sizes/checksums recorded for %d domain(s) (%s): their shards cannot be "
                           "checked against the manifest (written by an older odm-megatron preprocess; re-run it "
                           "to get the checks)", self.path, len(unchecked),
                           ", ".join(unchecked[:5]) + (", ..." if len(unchecked) > 5 else ""))
        return not unchecked
