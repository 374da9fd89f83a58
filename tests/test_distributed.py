"""Real multi-process runs (gloo, CPU): the same stream and weights on every rank and for any
data-parallel size, given the same per-sample losses."""
import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from mixer_helpers import make_mixer, train_synthetic
from odm_megatron.distributed import FeedbackReducer

SIZES = [37, 6, 120, 15, 60]
GBS, MBS, STEPS = 16, 2, 24


def _worker(rank, world_size, policy):
    mixer = make_mixer(SIZES, policy=policy, gbs=GBS, interval=2, lag=1, seed=2024)
    out = train_synthetic(mixer, range(0, STEPS), micro_batch_size=MBS, rank=rank, world_size=world_size)
    # every rank must also agree on the saved state, partial window included
    state = mixer.state_dict()
    return {"global": out["global"], "weights": out["weights"], "records": out["records"], "keys": out["keys"],
            "state": state}


@pytest.fixture(scope="module")
def runs():
    return {ws: run_distributed(_worker, ws, "odm-exp3") for ws in (1, 2, 4)}


def _assert_same(a, b):
    assert len(a["global"]) == len(b["global"]) == STEPS
    for (d1, p1), (d2, p2) in zip(a["global"], b["global"]):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(p1, p2)
    for w1, w2 in zip(a["weights"], b["weights"]):
        np.testing.assert_array_equal(w1, w2)
    assert len(a["records"]) == len(b["records"]) == STEPS // 2
    for r1, r2 in zip(a["records"], b["records"]):
        assert r1[0] == r2[0]
        for x, y in zip(r1[1:], r2[1:]):
            np.testing.assert_array_equal(x, y)
    assert a["state"] == b["state"]


def test_identical_on_every_rank_of_a_run(runs):
    for ws, results in runs.items():
        for r in range(1, ws):
            _assert_same(results[0], results[r])


def test_identical_for_1_2_and_4_processes(runs):
    _assert_same(runs[1][0], runs[2][0])
    _assert_same(runs[1][0], runs[4][0])
    assert not np.allclose(runs[1][0]["weights"][-1], 1 / len(SIZES)), "weights should have moved"


def test_ranks_consume_disjoint_parts_that_cover_the_stream(runs):
    for ws in (2, 4):
        consumed = sorted(k for rank_result in runs[ws] for batch in rank_result["keys"] for k in batch)
        expected = sorted(k for batch in runs[1][0]["keys"] for k in batch)
        assert consumed == expected


def _reducer_worker(rank, world_size):
    # rank 1 plays a TP rank > 0 (or a non-last pipeline stage): it must not be counted
    reducer = FeedbackReducer(contributes=(rank != 1))
    stats = torch.full((3, 4), rank + 1, dtype=torch.int64)
    return reducer.all_reduce(stats)


def test_only_contributing_ranks_count():
    results = run_distributed(_reducer_worker, 3)
    for r in results:
        np.testing.assert_array_equal(r, np.full((3, 4), 1 + 3))


def _tp_pp_worker(rank, world_size):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    try:
        reducer = FeedbackReducer()  # decides from megatron-core's parallel state
        totals = reducer.all_reduce(torch.full((3, 2), 10 ** rank, dtype=torch.int64))
        return ps.get_tensor_model_parallel_rank(), ps.is_pipeline_last_stage(), reducer.contributes, totals
    finally:
        ps.destroy_model_parallel()


def test_tensor_and_pipeline_parallel_contributors():
    """TP=2 x PP=2 on 4 ranks: only TP rank 0 of the last stage counts; every stage gets the totals."""
    results = run_distributed(_tp_pp_worker, 4)
    contributors = [rank for rank, (tp, last, contributes, _) in enumerate(results) if contributes]
    assert len(contributors) == 1
    tp, last, _, _ = results[contributors[0]]
    assert tp == 0 and last
    for _, _, _, totals in results:
        np.testing.assert_array_equal(totals, np.full((3, 2), 10 ** contributors[0]))
