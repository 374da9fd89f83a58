"""OnlineBlendedDataset over real megatron-core GPTDatasets built by megatron-core's builder."""
import os

import numpy as np
import pytest
import torch

from core_fixtures import EOD, VOCAB_SIZE, make_domains
from odm_megatron.dataset import (
    DatasetBuildError,
    OnlineBlendedDataset,
    TokenizerSpec,
    build_domain_datasets,
    make_gpt_dataset_config,
)
from megatron.core.datasets.gpt_dataset import GPTDataset


def _config(tmp_path, seed=7, seq_length=16):
    return make_gpt_dataset_config(seed=seed, seq_length=seq_length, tokenizer=TokenizerSpec(VOCAB_SIZE, EOD),
                                   path_to_cache=str(tmp_path / "cache"))


@pytest.fixture
def domains(tmp_path):
    prefixes = make_domains(str(tmp_path), [12, 4, 30])
    datasets = build_domain_datasets(prefixes, _config(tmp_path), domain_names=["a", "b", "c"])
    return prefixes, datasets


def test_items_are_gpt_samples_plus_dataset_id(domains):
    _, datasets = domains
    assert all(isinstance(d, GPTDataset) for d in datasets)
    ds = OnlineBlendedDataset(datasets, seed=7, domain_names=["a", "b", "c"])
    np.testing.assert_array_equal(ds.num_samples_per_domain, [len(d) for d in datasets])
    for dataset_id in range(3):
        for position in range(len(datasets[dataset_id])):  # epoch 0 is megatron-core's order
            item = ds[(dataset_id, position)]
            expected = datasets[dataset_id][position]
            assert item["dataset_id"] == dataset_id
            for key, value in expected.items():
                assert torch.equal(item[key], value), key
            # domain d's tokens lie in its own id range (EOD aside)
            tokens = item["tokens"][item["tokens"] != EOD]
            assert tokens.min() >= 1 + 40 * dataset_id and tokens.max() < 41 + 40 * dataset_id


def test_later_epochs_are_reshuffled_permutations(domains):
    _, datasets = domains
    ds = OnlineBlendedDataset(datasets, seed=7)
    n = int(ds.num_samples_per_domain[2])
    epochs = [[ds.sample_index(2, e * n + j) for j in range(n)] for e in range(4)]
    assert epochs[0] == list(range(n))  # epoch 0: megatron-core's own (already shuffled) order
    for order in epochs:
        assert sorted(order) == list(range(n))  # every sample exactly once per epoch
    for a in range(4):  # every epoch in its own order: epoch 1 reshuffled against epoch 0 too
        for b in range(a + 1, 4):
            assert epochs[a] != epochs[b], (a, b)
    again = OnlineBlendedDataset(datasets, seed=7)
    assert [again.sample_index(2, n + j) for j in range(n)] == epochs[1]  # deterministic
    other_seed = OnlineBlendedDataset(datasets, seed=8)
    assert [other_seed.sample_index(2, n + j) for j in range(n)] != epochs[1]


def test_index_cache_is_reused(tmp_path, domains):
    prefixes, _ = domains
    cache = tmp_path / "cache"
    files = sorted(os.listdir(cache))
    mtimes = [os.path.getmtime(cache / f) for f in files]
    build_domain_datasets(prefixes, _config(tmp_path), domain_names=["a", "b", "c"])
    assert sorted(os.listdir(cache)) == files
    assert [os.path.getmtime(cache / f) for f in files] == mtimes


def test_missing_prefix_is_a_clear_error(tmp_path, domains):
    prefixes, _ = domains
    with pytest.raises(DatasetBuildError, match=r"domain 'ghost'.*missing .*nothere_text_document.bin"):
        build_domain_datasets(prefixes[:1] + [str(tmp_path / "nothere_text_document")], _config(tmp_path),
                              domain_names=["a", "ghost"])


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no __del__ noise
def test_corrupt_idx_is_a_clear_error(tmp_path, domains):
    prefixes, _ = domains
    with open(prefixes[1] + ".idx", "r+b") as f:
        f.write(b"NOT-AN-INDEX-FILE")
    with pytest.raises(DatasetBuildError, match=r"domain 'b': cannot read indexed dataset"):
        build_domain_datasets(prefixes, _config(tmp_path, seed=8), domain_names=["a", "b", "c"])


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no __del__ noise
def test_truncated_idx_is_a_clear_error(tmp_path, domains):
    prefixes, _ = domains
    size = os.path.getsize(prefixes[2] + ".idx")
    with open(prefixes[2] + ".idx", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DatasetBuildError, match=r"domain 'c'"):
        build_domain_datasets(prefixes, _config(tmp_path, seed=9), domain_names=["a", "b", "c"])


def test_too_little_data_is_a_clear_error(tmp_path):
    prefixes = make_domains(str(tmp_path), [1], doc_len=5)
    with pytest.raises(DatasetBuildError, match="no train samples of 64 tokens"):
        build_domain_datasets(prefixes, _config(tmp_path, seq_length=64), domain_names=["tiny"])
