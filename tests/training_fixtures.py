"""Tiny multi-domain corpora + manifests for the training tests (no tokenizer, no shared data).

Three domains with different learnability, so the bandit has something to react to:
``counting`` (runs of consecutive ids: easy), ``motif`` (a per-document 6-token motif repeated:
learnable in context) and ``noise`` (uniform ids: unlearnable, highest loss).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from core_fixtures import write_indexed_dataset
from dist_utils import free_port  # noqa: F401  (the one copy; imported from here by other tests too)

VOCAB_SIZE = 256
EOD = 0
DOMAINS = ("counting", "motif", "noise")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _document(domain: str, rng: np.random.Generator, length: int) -> np.ndarray:
    if domain == "counting":
        start = int(rng.integers(1, 200))
        doc = (start + np.arange(length)) % 200 + 1
    elif domain == "motif":
        motif = rng.integers(1, VOCAB_SIZE, size=6)
        doc = np.resize(motif, length)
    else:
        doc = rng.integers(1, VOCAB_SIZE, size=length)
    return np.append(doc, EOD)


def make_corpus(directory: str, docs_per_domain: int = 60, doc_len: int = 70, seed: int = 0,
                domains: Sequence[str] = DOMAINS, tokenizer_sha256: Optional[str] = None) -> str:
    """Write ``<domain>_text_document.bin/.idx`` per domain and ``manifest.json``; returns the manifest path."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for name in domains:
        docs = [_document(name, rng, doc_len) for _ in range(docs_per_domain)]
        prefix = f"{name}_text_document"
        write_indexed_dataset(os.path.join(directory, prefix), docs)
        entries.append({"name": name, "prefix": prefix, "documents": len(docs),
                        "tokens": int(sum(len(d) for d in docs))})
    manifest = {
        "format": "odm-megatron-manifest", "version": 1, "domains": entries,
        "tokenizer": {"path": "none.model", "type": "sentencepiece", "vocab_size": VOCAB_SIZE, "eod_id": EOD,
                      "sha256": tokenizer_sha256},
    }
    path = os.path.join(directory, "manifest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return path


def make_train_valid(root: str, **kwargs) -> Dict[str, str]:
    """A training and a held-out manifest over the same domains (different documents)."""
    train = make_corpus(os.path.join(root, "train"), seed=0, **kwargs)
    valid = make_corpus(os.path.join(root, "valid"), seed=1, docs_per_domain=12, **{
        k: v for k, v in kwargs.items() if k != "docs_per_domain"})
    return {"train": train, "valid": valid}


TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
              "--micro-batch-size", "4", "--make-vocab-size-divisible-by", "64"]


def run_cli(args: List[str], nproc: int = 1, timeout: float = 300, env_extra: Optional[Dict[str, str]] = None
            ) -> subprocess.CompletedProcess:
    """``python -m odm_megatron ARGS`` (or under torchrun with ``nproc`` processes) in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.update(env_extra or {})
    if nproc == 1:
        cmd = [sys.executable, "-m", "odm_megatron", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "odm_megatron", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
