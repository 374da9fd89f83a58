"""The deterministic global sample order, as pure functions.

Two questions decide which sample global sample ``g`` is:

1. *Which domain?*  A pure function of ``(seed, g, weights in force at g's step)``: a
   counter-based hash turns ``(seed, g)`` into a uniform number in [0, 1), and the inverse CDF
   of the weights turns it into a domain. No RNG state is carried between samples, so any rank,
   any data-parallel layout and any resumed run computes the same domain for ``g``.
2. *Which sample of that domain?*  The domain's cursor: the number of samples that domain has
   already served. Cursor ``p`` of a domain with ``n`` samples is position ``p % n`` of epoch
   ``p // n``; epoch 0 is megatron-core's own shuffled order, every later epoch a fresh
   permutation seeded by ``(seed, domain, epoch)``. So no sample repeats before its domain's
   epoch is exhausted and none is skipped, however the weights move.

Memory is O(samples in one epoch of each domain), never O(training horizon).
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def sample_uniforms(seed: int, first_sample: int, count: int) -> np.ndarray:
    """Uniform numbers in [0, 1) for global samples ``first_sample .. first_sample+count-1``."""
    if seed < 0 or first_sample < 0 or count < 0:
        raise ValueError("seed, first_sample and count must be non-negative")
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    g = np.arange(first_sample, first_sample + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(g + _splitmix64(key ^ np.uint64(0xD1B54A32D192ED03)))
    return (bits >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)  # 53 bits / 2**53


def assign_domains(seed: int, first_sample: int, count: int, weights: np.ndarray) -> np.ndarray:
    """The domain (int64) of each global sample in ``[first_sample, first_sample + count)``.

    Domains with zero weight are never chosen.
    """
    w = np.asarray(weights, dtype=np.float64)
    positive = np.flatnonzero(w > 0)
    if positive.size == 0:
        raise ValueError("assign_domains: all weights are zero")
    cdf = np.cumsum(w / w.sum())
    u = sample_uniforms(seed, first_sample, count)
    domains = np.searchsorted(cdf, u, side="right")
    # u can exceed cdf[-1] by rounding: give those to the last domain that has weight.
    return np.minimum(domains, positive[-1]).astype(np.int64)


def epoch_permutation(seed: int, dataset_id: int, epoch: int, num_samples: int) -> np.ndarray:
    """The order of a domain's samples in its ``epoch`` (>= 1); epoch 0 is the identity.

    Stored in the smallest unsigned dtype that holds the indices (uint32 below 2**32 samples):
    each DataLoader worker keeps one such array per domain past its first epoch.
    """
    dtype = np.uint32 if num_samples <= np.iinfo(np.uint32).max else np.uint64
    if epoch == 0:
        return np.arange(num_samples, dtype=dtype)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, dataset_id, epoch])))
    return rng.permutation(num_samples).astype(dtype)


def advance_cursors(cursors: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """Positions in each domain's stream for ``domains`` (in global order), given the cursors
    before them. Updates ``cursors`` in place and returns the positions (int64)."""
    num_domains = cursors.size
    positions = np.empty(domains.size, dtype=np.int64)
    # k-th occurrence of domain d within this block gets cursor[d] + k.
    order = np.argsort(domains, kind="stable")
    sorted_domains = domains[order]
    counts = np.bincount(domains, minlength=num_domains)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank_in_domain = np.arange(domains.size, dtype=np.int64) - np.repeat(starts, counts)
    positions[order] = cursors[sorted_domains] + rank_in_domain
    cursors += counts
    return positions
