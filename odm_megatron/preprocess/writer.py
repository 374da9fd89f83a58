"""Per-domain Megatron indexed datasets, written so that an interrupted run never looks done.

Each domain gets megatron-core's ``IndexedDatasetBuilder`` writing ``<prefix>.bin.partial``;
``commit()`` writes ``<prefix>.idx.partial`` and only then renames both to their real names
(``.bin`` first: ``IndexedDataset.exists`` wants both). The manifest, written after all
renames, is the mark of a finished run. ``abort()`` removes the partial files.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from odm_megatron.output_errors import describe_write_error
from odm_megatron.preprocess.domains import DomainError, DomainRegistry

logger = logging.getLogger(__name__)

PARTIAL = ".partial"
MANIFEST_NAME = "manifest.json"


class OutputDirError(ValueError):
    """The output directory cannot be used (not empty without --overwrite, not a directory,
    read-only, full)."""


def output_error(e: OSError, path: str) -> OutputDirError:
    return OutputDirError(describe_write_error(e, path, "--output-dir"))


def indexed_dataset_module():
    """megatron-core's indexed_dataset, imported without its unrelated start-up chatter.

    Importing it imports all of ``megatron.core``, which logs and warns about optional training
    dependencies (Transformer Engine, Apex) that preprocessing never uses.
    """
    import importlib
    import warnings

    name = "megatron.core.datasets.indexed_dataset"
    if name in sys.modules:
        return sys.modules[name]
    megatron_logger = logging.getLogger("megatron")
    level = megatron_logger.level
    megatron_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    finally:
        megatron_logger.setLevel(level)


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype for the ids, by megatron-core's own rule (uint16 below 65500)."""
    return np.dtype(indexed_dataset_module().DType.optimal_dtype(vocab_size))


def _is_ours(name: str) -> bool:
    stem = name[: -len(PARTIAL)] if name.endswith(PARTIAL) else name
    return name == MANIFEST_NAME or name == MANIFEST_NAME + PARTIAL or (
        stem.endswith(("_text_document.bin", "_text_document.idx"))
    )


def prepare_output_dir(path: str, overwrite: bool) -> None:
    """Create ``path``; refuse a non-empty one unless ``overwrite``.

    With ``overwrite``, files this tool writes (manifest, ``*_text_document.bin/.idx``, partial
    files) are removed first, the manifest first, so shards from an older run are never listed
    next to new ones. Other files are left alone.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"output path exists and is not a directory: {path}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a parent is a file (ENOTDIR), read-only file system, ...
        raise output_error(e, path) from None
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not overwrite:
        raise OutputDirError(
            f"output directory is not empty: {path} ({len(entries)} entries); pass --overwrite to replace its shards"
        )
    for name in sorted(entries, key=lambda n: n != MANIFEST_NAME):
        if _is_ours(name) and os.path.isfile(os.path.join(path, name)):
            try:
                os.remove(os.path.join(path, name))
            except OSError as e:
                raise output_error(e, os.path.join(path, name)) from None


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (every domain keeps a shard open while
    writing; a corpus with a few thousand domains meets the common soft limit of 1024). Returns
    the limit in force."""
    try:
        import resource
    except ImportError:  # not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            logger.debug("could not raise the open-file limit from %d", soft)
    return soft


@dataclass
class DomainStats:
    name: str
    prefix: str
    documents: int = 0
    tokens: int = 0
    max_token_id: int = -1
    record: Dict[str, object] = field(default_factory=dict)  # sizes and .idx sha256, after commit


@dataclass
class ShardWriter:
    """Routes token arrays to one ``IndexedDatasetBuilder`` per domain."""

    output_dir: str
    dtype: np.dtype
    registry: DomainRegistry = field(default_factory=DomainRegistry)
    stats: Dict[str, DomainStats] = field(default_factory=dict)
    _builders: Dict[str, object] = field(default_factory=dict, repr=False)
    _closed: bool = field(default=False, repr=False)
    _committed: List[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._builder_cls = indexed_dataset_module().IndexedDatasetBuilder
        self.dtype = np.dtype(self.dtype)

    def _path(self, prefix: str, ext: str) -> str:
        return os.path.join(self.output_dir, prefix + ext)

    def _open(self, domain: str):
        prefix = self.registry.prefix(domain)  # raises on a file-name collision
        try:
            builder = self._builder_cls(self._path(prefix, ".bin" + PARTIAL), dtype=self.dtype.type)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise DomainError(
                    f"cannot open a shard for domain #{len(self._builders) + 1} ({domain!r}): every domain keeps "
                    f"one file open while writing and the open-file limit is reached ({e.strerror}); raise it "
                    f"(ulimit -n) or check --domain-key: {len(self._builders)} domains so far"
                ) from None
            raise output_error(e, self._path(prefix, ".bin" + PARTIAL)) from None
        self._builders[domain] = builder
        self.stats[domain] = DomainStats(domain, prefix)
        logger.debug("new domain %r -> %s", domain, prefix)
        return builder

    def add_documents(self, domains: List[str], offsets: np.ndarray, tokens: np.ndarray) -> None:
        """Append documents in order; ``domains[i]`` owns ``tokens[offsets[i]:offsets[i+1]]``."""
        import torch

        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        bounds = offsets.tolist()
        tensor = torch.from_numpy(tokens)
        lengths = np.diff(offsets)
        if len(domains) and lengths.min() > 0:  # the largest id of each document, for the manifest
            doc_max = np.maximum.reduceat(tokens, offsets[:-1]).tolist()
        else:
            doc_max = [int(tokens[s:e].max()) if e > s else -1 for s, e in zip(bounds[:-1], bounds[1:])]
        for i, domain in enumerate(domains):
            builder = self._builders.get(domain)
            if builder is None:
                builder = self._open(domain)
            start, end = bounds[i], bounds[i + 1]
            try:
                builder.add_document(tensor[start:end], [end - start])
            except OSError as e:  # full disk, quota
                raise output_error(e, self._path(self.stats[domain].prefix, ".bin" + PARTIAL)) from None
            stats = self.stats[domain]
            stats.documents += 1
            stats.tokens += end - start
            if doc_max[i] > stats.max_token_id:
                stats.max_token_id = doc_max[i]

    def commit(self) -> List[DomainStats]:
        """Write every index and rename the shards to their final names; sorted by domain name."""
        self._closed = True
        for domain, builder in self._builders.items():
            path = self._path(self.stats[domain].prefix, ".idx" + PARTIAL)
            try:
                builder.finalize(path)
            except OSError as e:
                raise output_error(e, path) from None
        for domain in self._builders:
            prefix = self.stats[domain].prefix
            for ext in (".bin", ".idx"):
                try:
                    os.replace(self._path(prefix, ext + PARTIAL), self._path(prefix, ext))
                except OSError as e:
                    raise output_error(e, self._path(prefix, ext)) from None
            self._committed.append(prefix)
        self._builders.clear()
        from odm_megatron.manifest import shard_record

        for stats in self.stats.values():  # what train checks its shards against
            stats.record = shard_record(os.path.join(self.output_dir, stats.prefix), stats.max_token_id)
        return [self.stats[d] for d in sorted(self.stats)]

    def remove_committed(self) -> None:
        """Delete the shards :meth:`commit` renamed (the manifest could not be written: without it
        they must not stay behind looking like a finished run's)."""
        for prefix in self._committed:
            for ext in (".bin", ".idx"):
                try:
                    os.remove(self._path(prefix, ext))
                except OSError:
                    pass
        self._committed.clear()

    def abort(self) -> None:
        """Close and delete the partial files (after an error or an interrupt)."""
        self._closed = True
        for domain, builder in self._builders.items():
            try:
                builder.data_file.close()
            except Exception:  # best effort: we are already failing
                pass
            prefix = self.stats[domain].prefix
            for ext in (".bin", ".idx"):
                try:
                    os.remove(self._path(prefix, ext + PARTIAL))
                except OSError:
                    pass
        self._builders.clear()
        self.remove_committed()
