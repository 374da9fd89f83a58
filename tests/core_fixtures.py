"""Small per-domain indexed datasets for core-engine tests (no shared data needed)."""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

VOCAB_SIZE = 512
EOD = 0


def write_indexed_dataset(prefix: str, documents: Sequence[np.ndarray]) -> None:
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    for doc in documents:
        builder.add_item(torch.from_numpy(np.asarray(doc, dtype=np.int64)))
        builder.end_document()
    builder.finalize(get_idx_path(prefix))


def make_domains(directory: str, docs_per_domain: Sequence[int], doc_len: int = 40, seed: int = 0) -> List[str]:
    """One indexed dataset per domain; domain d's tokens all lie in its own id range, so a
    sample's domain can be read off its tokens."""
    rng = np.random.default_rng(seed)
    prefixes = []
    for d, n_docs in enumerate(docs_per_domain):
        prefix = os.path.join(directory, f"domain{d}_text_document")
        lo = 1 + d * 40
        docs = [np.append(rng.integers(lo, lo + 40, size=doc_len), EOD) for _ in range(n_docs)]
        write_indexed_dataset(prefix, docs)
        prefixes.append(prefix)
    return prefixes
