"""The per-domain loss accumulator and mean_losses, tested on their own claims.

The claims (odm_megatron/feedback.py): loss sums are fixed point (int64, LOSS_SCALE units per
nat), so totals are exact and independent of the order of micro-batches and of how they are split
over ranks; per-token losses are clamped to +-MAX_ABS_TOKEN_LOSS; non-finite losses are counted in
the third row and kept out of the sum and the token count; masked tokens count for nothing.
Expected values are computed here in Python integers, token by token, not by the code under test.
"""
import itertools

import numpy as np
import pytest
import torch

from odm_megatron.feedback import (
    LOSS_SCALE,
    LOSS_SUM,
    MAX_ABS_TOKEN_LOSS,
    NONFINITE_COUNT,
    NUM_STATS,
    TOKEN_COUNT,
    DomainLossAccumulator,
    mean_losses,
    observed_tokens,
)

K, SEQ = 4, 16


def _micro_batches(n: int, seed: int = 0, batch: int = 3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        loss = torch.from_numpy(rng.gamma(2.0, 1.5, size=(batch, SEQ)).astype(np.float32))
        mask = torch.from_numpy((rng.random((batch, SEQ)) > 0.2).astype(np.float32))
        ids = torch.from_numpy(rng.integers(0, K, size=batch))
        out.append((loss, mask, ids))
    return out


def _expected_stats(micro_batches) -> np.ndarray:
    """Token by token, in Python integers: round(loss * 2**20) (round half to even, as torch)."""
    stats = [[0] * K for _ in range(NUM_STATS)]
    for loss, mask, ids in micro_batches:
        for b, d in enumerate(ids.tolist()):
            for value, m in zip(loss[b].tolist(), mask[b].tolist()):
                if m <= 0:
                    continue
                if not np.isfinite(value):
                    stats[NONFINITE_COUNT][d] += 1
                    continue
                value = min(max(value, -MAX_ABS_TOKEN_LOSS), MAX_ABS_TOKEN_LOSS)
                stats[LOSS_SUM][d] += round(value * LOSS_SCALE)
                stats[TOKEN_COUNT][d] += 1
    return np.array(stats, dtype=np.int64)


def _accumulate(micro_batches) -> np.ndarray:
    acc = DomainLossAccumulator(K)
    for mb in micro_batches:
        acc.add(*mb)
    assert acc.stats.dtype == torch.int64 and tuple(acc.stats.shape) == (NUM_STATS, K)
    return acc.stats.numpy().copy()


def test_sums_are_exact_fixed_point():
    mbs = _micro_batches(20)
    np.testing.assert_array_equal(_accumulate(mbs), _expected_stats(mbs))


def test_sums_are_independent_of_order_and_split():
    """Permuted micro-batches, and micro-batches split over simulated ranks whose int64 totals
    are then summed (as the all-reduce does): bit-identical totals every time."""
    mbs = _micro_batches(24, seed=1)
    reference = _accumulate(mbs)
    rng = np.random.default_rng(2)
    for _ in range(5):
        order = rng.permutation(len(mbs))
        np.testing.assert_array_equal(_accumulate([mbs[i] for i in order]), reference)
    for ranks in (2, 3, 4, 8):
        order = rng.permutation(len(mbs))
        parts = [_accumulate([mbs[i] for i in order[r::ranks]]) for r in range(ranks)]
        np.testing.assert_array_equal(np.sum(parts, axis=0), reference)
    # a checkpoint splitting the window in two (the restored part added to the rest)
    np.testing.assert_array_equal(_accumulate(mbs[:7]) + _accumulate(mbs[7:]), reference)
    # within a micro-batch: the rows of a micro-batch in another order
    perm = [(loss.flip(0), mask.flip(0), ids.flip(0)) for loss, mask, ids in mbs]
    np.testing.assert_array_equal(_accumulate(perm), reference)


def test_a_float_accumulator_would_fail_the_order_test():
    """Why fixed point: the same float32 losses summed in float32 in two orders differ, so the
    order test above has the power to catch an accumulator that sums floats."""
    values = np.random.default_rng(0).gamma(2.0, 1.5, size=4096).astype(np.float32)
    sums = {float(np.cumsum(values[np.random.default_rng(s).permutation(4096)], dtype=np.float32)[-1])
            for s in range(5)}  # cumsum: strictly sequential float32 additions
    assert len(sums) > 1, sums


def test_masked_tokens_count_for_nothing():
    loss = torch.tensor([[1.0, float("nan"), 1e30, 2.5]])
    mask = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    acc = DomainLossAccumulator(2)
    acc.add(loss, mask, torch.tensor([1]))
    assert acc.stats.tolist() == [[0, round(2.5 * LOSS_SCALE)], [0, 1], [0, 0]]
    # any positive mask value counts the token once (the mask is a selection, not a weight)
    acc.reset()
    acc.add(torch.tensor([[2.0, 2.0]]), torch.tensor([[0.5, 3.0]]), torch.tensor([0]))
    assert acc.stats.tolist() == [[4 * LOSS_SCALE, 0], [2, 0], [0, 0]]


def test_huge_losses_are_clamped():
    """+-1e30 counts as +-MAX_ABS_TOKEN_LOSS: one diverging token cannot overflow the int64 sum
    (or dominate it beyond 1e4 nats)."""
    acc = DomainLossAccumulator(3)
    loss = torch.tensor([[1e30, 3.0e38, -1e30, 1.0]], dtype=torch.float32)
    acc.add(loss, torch.ones_like(loss), torch.tensor([2]))
    cap = round(MAX_ABS_TOKEN_LOSS * LOSS_SCALE)
    assert acc.stats[:, 2].tolist() == [cap + cap - cap + LOSS_SCALE, 4, 0]
    # the documented headroom of one int64 sum: ~9e11 tokens of loss 10, and even ~8.8e8 tokens
    # all at the clamp (a whole window diverged) per domain and window
    assert (2**63 - 1) // (10 * LOSS_SCALE) > 8.7e11
    assert (2**63 - 1) // cap > 8.7e8
    # float16 / bfloat16 losses are read as float32 before the conversion
    acc.reset()
    acc.add(torch.tensor([[0.5, 65504.0]], dtype=torch.float16), torch.ones(1, 2), torch.tensor([0]))
    assert acc.stats[:, 0].tolist() == [LOSS_SCALE // 2 + cap, 2, 0]


def test_non_finite_losses_are_counted_in_the_third_row():
    acc = DomainLossAccumulator(3)
    nan, inf = float("nan"), float("inf")
    loss = torch.tensor([[nan, 1.0, inf], [2.0, 2.0, 2.0], [-inf, 3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    acc.add(loss, mask, torch.tensor([0, 2, 1]))
    assert acc.stats.tolist() == [[LOSS_SCALE, 3 * LOSS_SCALE, 6 * LOSS_SCALE], [1, 1, 3], [2, 1, 0]]
    mean, tokens = mean_losses(acc.stats.numpy())
    # a domain with any non-finite token has no mean (the policy skips it), the others keep theirs
    assert np.isnan(mean[0]) and np.isnan(mean[1]) and mean[2] == 2.0
    assert tokens.tolist() == [1, 1, 3]
    # measured tokens, non-finite ones included: a domain seen only through non-finite losses is
    # "observed" (the policy warns and skips it), not "unsampled"
    assert observed_tokens(acc.stats.numpy()).tolist() == [3, 2, 3]


def test_several_micro_batches_and_a_reset():
    acc = DomainLossAccumulator(2, device="cpu")
    for d in (0, 1, 1):
        acc.add(torch.full((1, 4), 0.25), torch.ones(1, 4), torch.tensor([d]))
    assert acc.stats.tolist() == [[LOSS_SCALE, 2 * LOSS_SCALE], [4, 8], [0, 0]]
    acc.reset()
    assert acc.stats.abs().sum().item() == 0


def test_bad_shapes_are_clear():
    acc = DomainLossAccumulator(2)
    with pytest.raises(ValueError, match=r"both be \[batch, seq\]"):
        acc.add(torch.ones(2, 3), torch.ones(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"dataset_id must be \[batch\] = \[2\]"):
        acc.add(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_domains must be >= 1"):
        DomainLossAccumulator(0)


def test_mean_losses_by_hand():
    stats = np.zeros((NUM_STATS, 4), dtype=np.int64)
    stats[LOSS_SUM] = [3 * LOSS_SCALE, LOSS_SCALE // 4, 0, 5 * LOSS_SCALE]
    stats[TOKEN_COUNT] = [2, 1, 0, 5]
    stats[NONFINITE_COUNT] = [0, 0, 0, 1]
    mean, tokens = mean_losses(stats)
    assert mean[:2].tolist() == [1.5, 0.25]
    assert np.isnan(mean[2])  # never observed
    assert np.isnan(mean[3])  # had a non-finite token
    assert tokens.tolist() == [2, 1, 0, 5]
    # a flat list (how the bandit state stores a partial window) reads the same
    flat_mean, flat_tokens = mean_losses(stats.ravel().tolist())
    np.testing.assert_array_equal(flat_mean, mean)
    np.testing.assert_array_equal(flat_tokens, tokens)


def test_mean_of_accumulated_losses_is_the_token_mean():
    """End to end: the mean per domain equals the plain mean of its unmasked losses to within
    the fixed-point resolution (half a unit per token)."""
    mbs = _micro_batches(10, seed=5)
    mean, tokens = mean_losses(_accumulate(mbs))
    for d in range(K):
        values = [v for loss, mask, ids in mbs for b, i in enumerate(ids.tolist()) if i == d
                  for v, m in zip(loss[b].tolist(), mask[b].tolist()) if m > 0]
        assert tokens[d] == len(values)
        assert abs(mean[d] - np.mean(values)) <= 0.5 / LOSS_SCALE + 1e-12


@pytest.mark.parametrize("split", list(itertools.combinations(range(1, 6), 2)))
def test_fixed_point_totals_survive_any_two_cuts(split):
    mbs = _micro_batches(6, seed=9)
    a, b = split
    pieces = [mbs[:a], mbs[a:b], mbs[b:]]
    np.testing.assert_array_equal(sum(_accumulate(p) for p in pieces), _accumulate(mbs))
