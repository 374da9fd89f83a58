"""The sample-order functions of odm_megatron.sampling, tested on their own claims.

Not the code against itself: the uniforms against a scalar re-implementation of the hash, the
drawn domain frequencies against the weights (a chi-square test with a stated false-alarm rate,
shown to reject a sampler biased by 1% of one weight), zero weights against crafted boundary
uniforms, and cursor arithmetic against positions worked out by hand.
"""
import math
from statistics import NormalDist

import numpy as np
import pytest

from odm_megatron import sampling
from odm_megatron.sampling import advance_cursors, assign_domains, epoch_permutation, sample_uniforms

ALPHA = 1e-6
"""False-alarm rate of every statistical test here: the probability that a correct sampler fails
it. The seeds are fixed, so each run is deterministic; ALPHA is the chance that an arbitrary seed
would have failed, i.e. the chance that these fixed seeds were unlucky."""


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """The chi-square quantile with upper tail ``alpha``.

    scipy when installed; otherwise the Wilson-Hilferty approximation
    ``df * (1 - 2/(9 df) + z sqrt(2/(9 df)))**3`` with z the normal quantile (stdlib). At
    alpha = 1e-6 it over-estimates the exact quantile, by 7% at df=3 falling to 0.2% at df=99
    (checked below): a slightly higher threshold, so the false-alarm rate stays below ``alpha``,
    and still far below the statistics the biased samplers below reach.
    """
    try:
        from scipy.stats import chi2
    except ImportError:
        z = NormalDist().inv_cdf(1.0 - alpha)
        a = 2.0 / (9.0 * df)
        return df * (1.0 - a + z * math.sqrt(a)) ** 3
    return float(chi2.isf(alpha, df))


def chi2_statistic(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic of observed ``counts`` against the distribution ``probs``."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(probs, dtype=np.float64)
    assert expected.min() >= 5, "chi-square needs >= 5 expected draws per cell"
    return float(((counts - expected) ** 2 / expected).sum())


def test_chi2_critical_fallback_is_close_to_the_exact_quantile(monkeypatch):
    """The fallback (no scipy) against known exact quantiles, so either path is trustworthy."""
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    # exact (scipy.stats.chi2.isf(1e-6, df)): df=3: 30.6648, 4: 33.3768, 24: 72.2289, 99: 180.792
    for df, exact in ((3, 30.6648), (4, 33.3768), (24, 72.2289), (99, 180.792)):
        assert exact <= chi2_critical(df) <= 1.07 * exact


# -- sample_uniforms ---------------------------------------------------------------------------
M64 = (1 << 64) - 1


def _splitmix64_scalar(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _uniform_scalar(seed: int, g: int) -> float:
    """The documented construction in Python integers: u = top 53 bits of
    splitmix64(g + splitmix64(splitmix64(seed) ^ C)) / 2**53."""
    key = _splitmix64_scalar(seed)
    bits = _splitmix64_scalar((g + _splitmix64_scalar(key ^ 0xD1B54A32D192ED03)) & M64)
    return (bits >> 11) / 2.0**53


def test_uniforms_match_a_scalar_reimplementation():
    for seed, first in ((0, 0), (11, 123_456_789), (2**40 + 3, 2**50)):
        u = sample_uniforms(seed, first, 50)
        expected = [_uniform_scalar(seed, first + i) for i in range(50)]
        assert u.tolist() == expected  # bit-exact
        assert u.dtype == np.float64


def test_uniforms_are_a_pure_function_of_the_global_index():
    """Any split of a range gives the same numbers: what lets every rank and every resume agree."""
    whole = sample_uniforms(5, 1000, 3000)
    parts = np.concatenate([sample_uniforms(5, 1000, 7), sample_uniforms(5, 1007, 993), sample_uniforms(5, 2000, 2000)])
    np.testing.assert_array_equal(whole, parts)
    assert not np.array_equal(whole, sample_uniforms(6, 1000, 3000))


def test_uniforms_are_uniform_and_pairs_independent():
    n = 400_000
    u = sample_uniforms(2024, 0, n)
    assert u.min() >= 0.0 and u.max() < 1.0
    bins = 100
    counts = np.bincount((u * bins).astype(np.int64), minlength=bins)
    assert chi2_statistic(counts, np.full(bins, 1 / bins)) < chi2_critical(bins - 1)
    # consecutive global samples (neighbours in one micro-batch) must not be correlated
    cells = (u[0::2] * 10).astype(np.int64) * 10 + (u[1::2] * 10).astype(np.int64)
    counts2 = np.bincount(cells, minlength=100)
    assert chi2_statistic(counts2, np.full(100, 1 / 100)) < chi2_critical(99)


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-negative"):
        sample_uniforms(-1, 0, 3)
    with pytest.raises(ValueError, match="all weights are zero"):
        assign_domains(0, 0, 3, np.zeros(3))


# -- assign_domains: frequencies ---------------------------------------------------------------
N_DRAWS = 1_000_000
WEIGHTS = np.array([0.46, 0.3, 0.15, 0.06, 0.03])


def _frequency_test_statistic(draw) -> float:
    """The chi-square statistic of N_DRAWS domains drawn by ``draw(seed, first, count, weights)``
    in 10 blocks of consecutive global samples (as 10 steps would draw them)."""
    block = N_DRAWS // 10
    domains = np.concatenate([draw(77, b * block, block, WEIGHTS) for b in range(10)])
    return chi2_statistic(np.bincount(domains, minlength=WEIGHTS.size), WEIGHTS)


def test_drawn_domain_frequencies_match_the_weights():
    """Pearson chi-square, df = K - 1 = 4, false-alarm rate ALPHA = 1e-6."""
    assert _frequency_test_statistic(assign_domains) < chi2_critical(WEIGHTS.size - 1)


@pytest.mark.parametrize("bias", ["shifted-weight", "dropped-rounding", "reused-uniform"])
def test_a_biased_sampler_fails_the_frequency_test(bias):
    """The same test has the power to see small biases (so its passing above means something)."""

    def biased(seed, first, count, weights):
        w = np.asarray(weights, dtype=np.float64).copy()
        if bias == "shifted-weight":  # 1% of domain 1's weight moved to domain 2
            w[1], w[2] = w[1] * 0.99, w[2] + w[1] * 0.01
            return assign_domains(seed, first, count, w)
        if bias == "dropped-rounding":  # the CDF without normalisation by the sum (sums to 0.99)
            cdf = np.cumsum(w * 0.99)
            u = sample_uniforms(seed, first, count)
            return np.minimum(np.searchsorted(cdf, u, side="right"), w.size - 1)
        # a uniform per pair of samples: right marginals, but each pair is drawn together
        u = np.repeat(sample_uniforms(seed, first // 2, (count + 1) // 2), 2)[:count]
        cdf = np.cumsum(w / w.sum())
        d = np.searchsorted(cdf, u, side="right")
        return np.minimum(d, w.size - 1)

    statistic = _frequency_test_statistic(biased)
    if bias == "reused-uniform":
        # marginals are right (the frequency test cannot see this), so test pairs instead:
        # a correct sampler draws the domains of samples 2i and 2i+1 independently
        domains = biased(77, 0, N_DRAWS, WEIGHTS)
        pairs = domains[0::2] * WEIGHTS.size + domains[1::2]
        counts = np.bincount(pairs, minlength=WEIGHTS.size ** 2)
        assert chi2_statistic(counts, np.outer(WEIGHTS, WEIGHTS).ravel()) > chi2_critical(WEIGHTS.size ** 2 - 1)
        # and the real sampler passes the same pair test
        domains = assign_domains(77, 0, N_DRAWS, WEIGHTS)
        pairs = domains[0::2] * WEIGHTS.size + domains[1::2]
        counts = np.bincount(pairs, minlength=WEIGHTS.size ** 2)
        assert chi2_statistic(counts, np.outer(WEIGHTS, WEIGHTS).ravel()) < chi2_critical(WEIGHTS.size ** 2 - 1)
    else:
        assert statistic > chi2_critical(WEIGHTS.size - 1), statistic


def test_frequencies_track_weights_that_change_between_steps():
    """Blocks drawn with different weights (as steps after updates are): each block matches its own."""
    rng = np.random.default_rng(3)
    first = 0
    for _ in range(5):
        w = rng.dirichlet(np.ones(4)) * 0.8 + 0.05  # every weight >= 0.05: >= 5 expected per cell
        count = 200_000
        counts = np.bincount(assign_domains(9, first, count, w), minlength=4)
        assert chi2_statistic(counts, w / w.sum()) < chi2_critical(3)
        first += count


def test_unnormalised_weights_are_normalised():
    a = assign_domains(4, 0, 10_000, np.array([2.0, 6.0, 2.0]))
    b = assign_domains(4, 0, 10_000, np.array([0.2, 0.6, 0.2]))
    np.testing.assert_array_equal(a, b)


# -- assign_domains: zero and tiny weights -----------------------------------------------------
@pytest.mark.parametrize("weights", [
    [0.0, 1e-12, 0.5, 0.0, 0.5 - 1e-12, 0.0],
    [0.0, 0.0, 1.0],
    [1.0, 0.0, 0.0],
    [1e-12, 0.0, 1.0 - 1e-12, 0.0],
    [0.3, 0.0, 0.7 - 1e-12, 1e-12],
])
def test_a_zero_weight_is_never_drawn(weights):
    w = np.asarray(weights)
    domains = assign_domains(13, 0, 2_000_000, w)
    counts = np.bincount(domains, minlength=w.size)
    assert np.all(counts[w == 0] == 0), counts
    # a 1e-12 weight is expected 2e-6 times in 2e6 draws: seeing it more than once has
    # probability < (2e-6)**2 / 2, far below ALPHA
    assert np.all(counts[(w > 0) & (w < 1e-9)] <= 1), counts


def _domains_for_uniforms(monkeypatch, u, weights):
    monkeypatch.setattr(sampling, "sample_uniforms", lambda seed, first, count: np.asarray(u, dtype=np.float64))
    return assign_domains(0, 0, len(u), np.asarray(weights, dtype=np.float64)).tolist()


def test_interval_boundaries_and_rounding(monkeypatch):
    """Crafted uniforms at the edges: every CDF boundary, 0, and the largest double below 1."""
    below_one = np.nextafter(1.0, 0.0)
    w = [0.0, 0.25, 0.0, 0.0, 0.5, 0.25, 0.0]
    # domain i owns [cdf[i-1], cdf[i]): 1 -> [0, .25), 4 -> [.25, .75), 5 -> [.75, 1)
    u = [0.0, np.nextafter(0.25, 0.0), 0.25, np.nextafter(0.75, 0.0), 0.75, below_one]
    assert _domains_for_uniforms(monkeypatch, u, w) == [1, 1, 4, 4, 5, 5]
    # weights whose CDF rounds to just below 1: u above cdf[-1] goes to the last positive domain,
    # never to a zero-weight domain after it
    w = [1 / 7] * 7 + [0.0, 0.0]
    cdf_end = np.cumsum(np.asarray(w) / np.sum(w))[-1]
    assert cdf_end < 1.0  # the cumulative sum of seven 1/7 is 0.9999999999999998
    assert _domains_for_uniforms(monkeypatch, [cdf_end, below_one], w) == [6, 6]
    # a tiny weight is drawable: it owns the interval just above the previous cumulative weight
    w = [0.5, 1e-12, 0.5 - 1e-12]
    assert _domains_for_uniforms(monkeypatch, [0.5, 0.5 + 5e-13, 0.5 + 2e-12], w) == [1, 1, 2]


# -- advance_cursors ---------------------------------------------------------------------------
def test_cursor_arithmetic_by_hand():
    cursors = np.array([5, 0, 2, 9], dtype=np.int64)
    domains = np.array([2, 0, 2, 2, 1, 0], dtype=np.int64)
    # domain 2: cursor 2 -> positions 2, 3, 4; domain 0: 5, 6; domain 1: 0; domain 3 untouched
    positions = advance_cursors(cursors, domains)
    assert positions.tolist() == [2, 5, 3, 4, 0, 6]
    assert positions.dtype == np.int64
    assert cursors.tolist() == [7, 1, 5, 9]  # updated in place
    assert advance_cursors(cursors, np.array([], dtype=np.int64)).tolist() == []
    assert cursors.tolist() == [7, 1, 5, 9]


def test_cursors_match_a_scalar_loop_and_any_split():
    rng = np.random.default_rng(0)
    k = 7
    domains = rng.integers(0, k, size=5000)
    start = rng.integers(0, 1000, size=k)
    expected, c = [], start.tolist()
    for d in domains.tolist():  # the definition: each sample takes its domain's next position
        expected.append(c[d])
        c[d] += 1
    cursors = start.copy()
    assert advance_cursors(cursors, domains).tolist() == expected
    assert cursors.tolist() == c
    split, cursors = [], start.copy()
    for a, b in ((0, 1), (1, 1000), (1000, 1000), (1000, 4999), (4999, 5000)):
        split.extend(advance_cursors(cursors, domains[a:b]).tolist())
    assert split == expected and cursors.tolist() == c


def test_epoch_permutations():
    n = 1000
    np.testing.assert_array_equal(epoch_permutation(3, 1, 0, n), np.arange(n))
    p1, p2 = epoch_permutation(3, 1, 1, n), epoch_permutation(3, 1, 2, n)
    assert p1.dtype == np.uint32
    assert sorted(p1.tolist()) == list(range(n)) and sorted(p2.tolist()) == list(range(n))
    assert p1.tolist() != p2.tolist() and p1.tolist() != list(range(n))
    np.testing.assert_array_equal(p1, epoch_permutation(3, 1, 1, n))  # deterministic
    assert epoch_permutation(3, 2, 1, n).tolist() != p1.tolist()  # per domain
