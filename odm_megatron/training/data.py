"""Training and validation data for ``odm-megatron train``.

Sources: a manifest from ``odm-megatron preprocess`` (domain names, prefixes, token counts and the
tokenizer in one file) or Megatron's ``--data-path W1 PREFIX1 W2 PREFIX2 ...`` (the weights become
the natural prior, domain names come from the prefixes). Validation data (``--valid-manifest`` or
``--valid-data-path``) must use the same tokenizer but may name any domains: trained domains with
validation data are the headline figures, trained domains without it are listed once at start-up,
and validation domains that were never trained on are evaluated as held-out domains. Its
per-domain datasets are built with a fixed seed (:data:`EVAL_DATA_SEED`), independent of
``--seed``, so the evaluation windows are the same for every run and every policy.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from odm_megatron.dataset import domain_name_from_prefix
from odm_megatron.training.arguments import ConfigError, parse_data_path

logger = logging.getLogger(__name__)

EVAL_DATA_SEED = 1234
"""Seed of the validation GPTDatasets' document/sample shuffle: fixed, so that every run (any
--seed, any policy) evaluates on the same windows."""


@dataclass
class DataSource:
    """Where a split's per-domain shards are and what they were tokenized with."""

    domain_names: List[str]
    prefixes: List[str]
    natural_weights: np.ndarray  # tokens per domain (manifest) or the --data-path weights
    vocab_size: int
    eod_id: int
    tokenizer_path: Optional[str] = None
    tokenizer_sha256: Optional[str] = None
    description: str = ""


@dataclass
class TrainingData:
    train: Optional[DataSource]
    valid: Optional[DataSource]
    train_dataset: "object" = None  # OnlineBlendedDataset
    valid_datasets: Optional[List["object"]] = None  # GPTDataset per validation domain (valid.domain_names order)

    @property
    def domain_names(self) -> List[str]:
        return self.train.domain_names


def _source_from_manifest(path: str, what: str) -> DataSource:
    from odm_megatron.manifest import Manifest, ManifestError

    try:
        manifest = Manifest.load(path)
        manifest.verify_shards()  # sizes, .idx sha256 and max token id, before anything is built
    except ManifestError as e:
        raise ConfigError(f"{what}: {e}") from None
    return DataSource(
        domain_names=manifest.domain_names,
        prefixes=manifest.prefixes,
        natural_weights=np.array([d.tokens for d in manifest.domains], dtype=np.float64),
        vocab_size=manifest.tokenizer.vocab_size,
        eod_id=manifest.tokenizer.eod_id,
        tokenizer_path=manifest.tokenizer.path,
        tokenizer_sha256=manifest.tokenizer.sha256,
        description=manifest.path,
    )


def _source_from_data_path(values: List[str], vocab_size: int, eod_id: int, what: str) -> DataSource:
    weights, prefixes = parse_data_path(values)
    prefixes = [os.path.abspath(p) for p in prefixes]
    names = [domain_name_from_prefix(p) for p in prefixes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{what}: two prefixes give the same domain name {duplicates}; rename the shards")
    return DataSource(names, prefixes, np.asarray(weights, dtype=np.float64), vocab_size, eod_id,
                      description=what)


def resolve_sources(args: argparse.Namespace) -> TrainingData:
    """Read the manifests / data paths and check that train and validation agree."""
    if args.manifest is not None:
        train = _source_from_manifest(args.manifest, "--manifest")
    else:
        train = _source_from_data_path(args.data_path, args.vocab_size, args.eod_id, "--data-path")

    valid = None
    if args.valid_manifest is not None:
        valid = _source_from_manifest(args.valid_manifest, "--valid-manifest")
    elif args.valid_data_path is not None:
        values = args.valid_data_path
        prefixes = values if all(not _is_number(v) for v in values) else parse_data_path(values)[1]
        names = [domain_name_from_prefix(p) for p in prefixes]  # as for --data-path
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"--valid-data-path: two prefixes give the same domain name {duplicates}; "
                              "rename the shards")
        valid = DataSource(names, [os.path.abspath(p) for p in prefixes], np.ones(len(prefixes)),
                           train.vocab_size, train.eod_id, description="--valid-data-path")
    if valid is not None:
        _check_valid(train, valid)
    return TrainingData(train=train, valid=valid)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_valid(train: DataSource, valid: DataSource) -> None:
    """Errors if the validation data was tokenized differently; says once (one line) which
    trained domains have no validation data and which validation domains are held out."""
    unscored = [n for n in train.domain_names if n not in valid.domain_names]
    held_out = [n for n in valid.domain_names if n not in train.domain_names]
    if valid.vocab_size != train.vocab_size or valid.eod_id != train.eod_id:
        raise ConfigError(
            f"validation data {valid.description} was tokenized differently (vocab {valid.vocab_size}, "
            f"eod {valid.eod_id}) from the training data (vocab {train.vocab_size}, eod {train.eod_id})"
        )
    if valid.tokenizer_sha256 and train.tokenizer_sha256 and valid.tokenizer_sha256 != train.tokenizer_sha256:
        raise ConfigError(
            f"validation data {valid.description} was made with another tokenizer model than the training "
            f"data (sha256 {valid.tokenizer_sha256[:12]} vs {train.tokenizer_sha256[:12]})"
        )
    if len(held_out) == len(valid.domain_names):
        logger.warning("validation data %s shares no domain with the training data %s: no headline average; "
                       "all %d validation domains are reported as held-out", valid.description,
                       train.description, len(held_out))
    elif unscored or held_out:
        logger.info("validation: %d of %d trained domains have validation data; not evaluated (no validation "
                    "data): %s; held-out (not trained on, reported separately): %s",
                    len(train.domain_names) - len(unscored), len(train.domain_names),
                    ", ".join(unscored) or "none", ", ".join(held_out) or "none")


def build_datasets(args: argparse.Namespace, data: TrainingData) -> TrainingData:
    """Build the per-domain megatron-core GPTDatasets (collective: rank 0 builds the index caches
    first, the other ranks then load them) and the online blended training dataset."""
    from megatron.core.datasets.utils import Split

    from odm_megatron.dataset import (DatasetBuildError, OnlineBlendedDataset, TokenizerSpec,
                                      build_domain_datasets, make_gpt_dataset_config)

    train = data.train
    try:
        tok = TokenizerSpec(vocab_size=train.vocab_size, eod=train.eod_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cache = args.data_cache_path
    try:
        cfg = make_gpt_dataset_config(seed=args.seed, seq_length=args.seq_length, tokenizer=tok, path_to_cache=cache)
        datasets = build_domain_datasets(train.prefixes, cfg, split=Split.train, domain_names=train.domain_names)
        data.train_dataset = OnlineBlendedDataset(datasets, seed=args.seed, domain_names=train.domain_names)
        if data.valid is not None:
            vcfg = make_gpt_dataset_config(seed=EVAL_DATA_SEED, seq_length=args.seq_length, tokenizer=tok,
                                           path_to_cache=cache)
            data.valid_datasets = build_domain_datasets(data.valid.prefixes, vcfg, split=Split.train,
                                                        domain_names=data.valid.domain_names)
    except DatasetBuildError as e:
        raise ConfigError(str(e)) from None
    counts = ", ".join(f"{n}={c}" for n, c in zip(train.domain_names, data.train_dataset.num_samples_per_domain))
    logger.info("training samples of %d tokens per domain (one epoch): %s", args.seq_length, counts)
    return data


class PositionTaggedDataset(torch.utils.data.Dataset):
    """Adds the sample's within-domain position to each item, for ``--log-sample-order``."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        item = self.dataset[key]
        item["position"] = int(key[1])
        return item
