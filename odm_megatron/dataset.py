"""Per-domain megatron-core GPTDatasets behind one online, re-weightable dataset.

megatron-core's ``BlendedDataset`` precomputes, for every training sample, which dataset and
which sample it comes from: an index of size (training horizon), fixed weights, built before
step 0. An online mixer cannot have that. Here each domain is an ordinary one-epoch
``GPTDataset`` built (and cached) by megatron-core's own ``BlendedMegatronDatasetBuilder``, and
:class:`OnlineBlendedDataset` is addressed by *keys* ``(dataset_id, position)`` that the
:class:`~odm_megatron.mixer.OnlineMixer` hands out, ``position`` being how many samples that
domain had served before. The dataset itself is stateless, so DataLoader workers can serve it.

Index caches are keyed by content: each domain's cache lives in a subdirectory named by its
``.idx`` sha256 and ``.bin`` size (:func:`content_keyed_cache_dir`), so a shard re-made by
``preprocess --overwrite`` never meets the sample index of the shard it replaced.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import struct
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split

from odm_megatron.sampling import epoch_permutation

logger = logging.getLogger(__name__)

SampleKey = Tuple[int, int]  # (dataset_id, position in that domain's sample stream)


class DatasetBuildError(RuntimeError):
    """A domain's indexed dataset is missing, unreadable or too small."""


class TokenizerSpec:
    """The part of a tokenizer that megatron-core's GPTDataset needs: vocab size and EOD id.

    Datasets never tokenize; passing this instead of a full tokenizer keeps the data path free
    of tokenizer libraries.
    """

    def __init__(self, vocab_size: int, eod: int, pad: Optional[int] = None) -> None:
        if vocab_size <= 0 or not 0 <= eod < vocab_size:
            raise ValueError(f"bad tokenizer spec: vocab_size={vocab_size}, eod={eod}")
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        if pad is not None:
            self.pad = int(pad)
        # Part of megatron-core's dataset cache key.
        self.unique_identifiers = OrderedDict(
            [("class", "TokenizerSpec"), ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )


def make_gpt_dataset_config(
    seed: int,
    seq_length: int,
    tokenizer: TokenizerSpec,
    path_to_cache: Optional[str] = None,
    split: str = "100,0,0",
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
    **kwargs,
) -> GPTDatasetConfig:
    """A megatron-core ``GPTDatasetConfig`` for per-domain datasets.

    ``blend`` is filled per domain by :func:`build_domain_datasets`; the placeholder here only
    satisfies the config's own validation.
    """
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(["<per-domain>"], None),
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **kwargs,
    )


def domain_name_from_prefix(prefix: str) -> str:
    """``/data/pile/github_text_document`` -> ``github`` (Megatron's preprocess suffix dropped)."""
    name = os.path.basename(os.path.normpath(prefix))
    for suffix in ("_text_document", "_document", "_text"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _check_prefix(prefix: str, name: str) -> None:
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise DatasetBuildError(
            f"domain {name!r}: indexed dataset not found: missing {', '.join(missing)} "
            f"(prefix {prefix!r}; make shards with `odm-megatron preprocess`)"
        )
    problem = index_bin_mismatch(prefix)
    if problem:
        raise DatasetBuildError(f"domain {name!r}: cannot read indexed dataset {prefix!r}: {problem}; re-run `odm-megatron preprocess` "
                                f"or restore the matching .bin/.idx pair")


_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_FIXED = 34  # header 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core DType codes -> bytes


def index_bin_mismatch(prefix: str) -> Optional[str]:
    """Why ``prefix``.idx does not describe ``prefix``.bin, or None. Needs no manifest and reads
    only the .idx header and its last pointer: the .bin must end exactly where the index's last
    sequence does (a truncated .bin, or an .idx from a larger shard, fails), and the .idx must
    have the size its own counts imply."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    with open(idx, "rb") as f:
        head = f.read(_IDX_FIXED)
        if len(head) < _IDX_FIXED or head[:9] != _IDX_HEADER:
            return f"{idx} is not a megatron-core index (bad header)"
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
        itemsize = _DTYPE_SIZES.get(code)
        if version != 1 or itemsize is None:
            return f"{idx} has an unknown version {version} or dtype code {code}"
        expected = _IDX_FIXED + 12 * sequences + 8 * documents
        if idx_size not in (expected, expected + sequences):  # + 1 byte per sequence: multimodal
            return f"{idx} is {idx_size:,} bytes, its counts imply {expected:,} (truncated or corrupt)"
        if sequences == 0:
            end = 0
        else:
            f.seek(_IDX_FIXED + 4 * (sequences - 1))
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_IDX_FIXED + 4 * sequences + 8 * (sequences - 1))
            (last_pointer,) = struct.unpack("<q", f.read(8))
            end = last_pointer + last_length * itemsize
    if end != bin_size:
        how = "truncated" if bin_size < end else "longer"
        return (f"{bin_} is {bin_size:,} bytes but {idx} indexes {end:,} ({how} .bin, or an .idx that "
                f"belongs to another shard)")
    return None


def content_keyed_cache_dir(prefix: str, path_to_cache: Optional[str]) -> str:
    """``<cache>/<shard name>-<.idx sha256[:16]>-<.bin bytes>``, where ``<cache>`` is
    ``path_to_cache`` or ``cache/`` next to the shard (megatron-core's own default keys its cache
    files by path and settings only, so a re-made shard would meet the old sample index)."""
    from odm_megatron.manifest import file_sha256

    base = path_to_cache or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    key = f"{os.path.basename(prefix)}-{file_sha256(prefix + '.idx')[:16]}-{os.path.getsize(prefix + '.bin')}"
    return os.path.join(base, key)


@contextlib.contextmanager
def _quiet_half_built_indexed_dataset():
    """Drop the "Exception ignored in IndexedDataset.__del__" that megatron-core prints when an
    ``IndexedDataset`` fails half-way through ``__init__`` (its ``__del__`` assumes a complete
    object): after our one-line error, that traceback would only confuse."""
    previous = sys.unraisablehook

    def hook(unraisable):
        obj = getattr(unraisable, "object", None)
        if not (isinstance(unraisable.exc_value, AttributeError)
                and getattr(obj, "__qualname__", "") == "IndexedDataset.__del__"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _is_built_on_rank() -> bool:
    return True


def build_domain_datasets(
    prefixes: Sequence[str],
    config: GPTDatasetConfig,
    split: Split = Split.train,
    domain_names: Optional[Sequence[str]] = None,
) -> List[GPTDataset]:
    """One one-epoch ``GPTDataset`` per prefix, built through megatron-core's builder.

    The builder handles index construction, the on-disk index cache (rank 0 builds, the others
    wait and load) and the split. Errors name the domain and the prefix.
    """
    names = list(domain_names) if domain_names is not None else [domain_name_from_prefix(p) for p in prefixes]
    if len(names) != len(prefixes):
        raise ValueError(f"{len(prefixes)} prefixes but {len(names)} domain names")
    if not prefixes:
        raise ValueError("no dataset prefixes given")
    datasets = []
    for prefix, name in zip(prefixes, names):
        _check_prefix(prefix, name)
        domain_config = _config_for_prefix(config, prefix)
        sizes = [None] * len(Split)
        problem = None
        with _quiet_half_built_indexed_dataset():
            try:
                built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, _is_built_on_rank, domain_config).build()
            except Exception as e:  # corrupt .idx, mismatched .bin, ... surface as one line
                logger.debug("reading %s failed", prefix, exc_info=True)
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                gc.collect()  # the half-built object goes now, while the quiet hook is in place
        if problem is not None:
            raise DatasetBuildError(f"domain {name!r}: cannot read indexed dataset {prefix!r}: {problem}")
        dataset = built[split.value]
        if dataset is None or len(dataset) == 0:
            raise DatasetBuildError(
                f"domain {name!r}: no {split.name} samples of {config.sequence_length} tokens in "
                f"{prefix!r} (too little data for this sequence length and split {config.split!r})"
            )
        datasets.append(dataset)
    return datasets


def _config_for_prefix(config: GPTDatasetConfig, prefix: str) -> GPTDatasetConfig:
    fields = {
        f: getattr(config, f)
        for f in config.__dataclass_fields__
        if config.__dataclass_fields__[f].init and f not in ("blend", "blend_per_split")
    }
    if not getattr(config, "mock", False):
        fields["path_to_cache"] = content_keyed_cache_dir(prefix, config.path_to_cache)
    return GPTDatasetConfig(**{**fields, "blend": ([prefix], None)})


class OnlineBlendedDataset(torch.utils.data.Dataset):
    """Domains' GPTDatasets addressed by ``(dataset_id, position)`` keys.

    ``position`` counts the samples the domain has served so far (its cursor); position ``p``
    is sample ``p % n`` of epoch ``p // n`` (see :mod:`odm_megatron.sampling`). Items are
    megatron-core sample dicts plus ``dataset_id``, as megatron-core's BlendedDataset returns.
    """

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        seed: int,
        domain_names: Optional[Sequence[str]] = None,
    ) -> None:
        if not datasets:
            raise ValueError("OnlineBlendedDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.seed = int(seed)
        self.domain_names = list(domain_names) if domain_names is not None else [
            os.path.basename(d.dataset_path or f"domain{i}") for i, d in enumerate(self.datasets)
        ]
        if len(self.domain_names) != len(self.datasets):
            raise ValueError(f"{len(self.datasets)} datasets but {len(self.domain_names)} domain names")
        self.num_samples_per_domain = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self._epoch_sizes = self.num_samples_per_domain.tolist()  # plain ints: the per-sample fast path
        # Per worker: the permutation of the epoch each domain is in (one epoch per domain).
        self._epoch_orders: Dict[int, Tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        """Samples in one epoch of every domain (the stream itself is unbounded)."""
        return int(self.num_samples_per_domain.sum())

    def sample_index(self, dataset_id: int, position: int) -> int:
        """The index into domain ``dataset_id``'s GPTDataset of its ``position``-th sample."""
        n = self._epoch_sizes[dataset_id]
        if position < n:  # first epoch: megatron-core's own shuffled order
            return position
        epoch, offset = divmod(position, n)
        cached = self._epoch_orders.get(dataset_id)
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_permutation(self.seed, dataset_id, epoch, n))
            self._epoch_orders[dataset_id] = cached
        return int(cached[1][offset])

    def __getitem__(self, key: SampleKey) -> Dict[str, torch.Tensor]:
        dataset_id, position = int(key[0]), int(key[1])
        sample = self.datasets[dataset_id][self.sample_index(dataset_id, position)]
        return {"dataset_id": dataset_id, **sample}
