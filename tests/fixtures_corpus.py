"""Shared helpers for the preprocessing and tokenizer tests: a tiny Pile-format corpus and a
SentencePiece model trained on it (a fraction of a second), both generated, never downloaded."""
from __future__ import annotations

import os
from typing import Dict, List

from odm_megatron.cli import main as cli_main
from odm_megatron.preprocess.fixtures import make_documents, write_corpus

VOCAB = 400


def train_test_tokenizer(workdir: str, records: List[dict], model_type: str = "bpe", vocab: int = VOCAB) -> str:
    corpus = write_corpus(os.path.join(workdir, f"tok_corpus_{model_type}.jsonl"), records)
    prefix = os.path.join(workdir, f"tok_{model_type}")
    rc = cli_main(["train-tokenizer", "--input", corpus, "--vocab-size", str(vocab), "--model-type", model_type,
                   "--output", prefix, "--sample-bytes", "1M", "--threads", "1"])
    assert rc == 0
    return prefix + ".model"


def records_by_domain(records: List[dict], key: str = "pile_set_name") -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for r in records:
        out.setdefault(r["meta"][key], []).append(r["text"])
    return out


def corpus_records(seed: int = 0) -> List[dict]:
    return make_documents(seed=seed)


def read_shard(prefix: str) -> List[List[int]]:
    """Every document of a Megatron indexed dataset, as lists of ids (through megatron-core)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]
