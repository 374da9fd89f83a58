"""The mixer's three pieces on their own: the weight schedule, the sample stream, the feedback window."""
import numpy as np
import pytest
import torch

from odm_megatron.feedback import LOSS_SCALE, NUM_STATS
from odm_megatron.sampling import assign_domains
from odm_megatron.schedule import WeightSchedule
from odm_megatron.stream import SampleStream, prefetch_steps_ahead, validate_prefetch
from odm_megatron.window import FeedbackWindow

A, B, C = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.5, 0.5])


# -- WeightSchedule ------------------------------------------------------------------------------
def test_schedule_entries_are_in_force_from_their_step():
    s = WeightSchedule(A)
    s.decide(3, B)
    s.decide(5, C)
    assert [s.weights_for(t).tolist() for t in range(7)] == [A.tolist()] * 3 + [B.tolist()] * 2 + [C.tolist()] * 2
    assert s.latest.tolist() == C.tolist() and s.last_decision_step == 5
    np.testing.assert_array_equal(s.mean_over(2, 6), (A + B + B + C) / 4)
    w = s.weights_for(0)
    w[0] = 99.0  # copies: callers cannot change the schedule
    assert s.weights_for(0).tolist() == A.tolist()


def test_schedule_newer_decision_replaces_later_ones():
    s = WeightSchedule(A)
    s.decide(4, B)
    s.decide(5, B)
    s.decide(4, C)  # decided later under a shorter lag: wins from step 4 on
    assert s.entries() == [(0, A.tolist()), (4, C.tolist())]
    with pytest.raises(ValueError, match="would replace the weights in force before it"):
        s.decide(0, B)


def test_schedule_forgets_only_what_no_later_step_needs():
    s = WeightSchedule(A)
    for step, w in ((2, B), (4, C), (6, A)):
        s.decide(step, w)
    s.forget_before(5)
    assert s.earliest_step == 4 and len(s) == 2
    assert s.weights_for(5).tolist() == C.tolist()
    with pytest.raises(ValueError, match="weights for step 3 were discarded"):
        s.weights_for(3)
    s.forget_before(100)
    assert len(s) == 1 and s.weights_for(100).tolist() == A.tolist()


def test_schedule_round_trip_and_bad_entries():
    s = WeightSchedule(A)
    s.decide(3, B)
    again = WeightSchedule.from_entries(s.entries())
    assert again.entries() == s.entries()
    with pytest.raises(ValueError, match="not in order"):
        WeightSchedule.from_entries([(0, A.tolist()), (5, B.tolist()), (3, C.tolist())])
    with pytest.raises(ValueError, match="at least one entry"):
        WeightSchedule.from_entries([])
    with pytest.raises(ValueError, match="empty step range"):
        s.mean_over(4, 4)


# -- SampleStream --------------------------------------------------------------------------------
def _stream(weights_for_step=lambda step: np.array([0.2, 0.3, 0.5])):
    return SampleStream(seed=3, global_batch_size=16, num_domains=3, weights_for_step=weights_for_step)


def test_stream_draws_once_and_commits_cursors_on_completion():
    stream = _stream()
    d0, p0 = stream.draw(0)
    d1, p1 = stream.draw(1)
    np.testing.assert_array_equal(d0, assign_domains(3, 0, 16, np.array([0.2, 0.3, 0.5])))
    np.testing.assert_array_equal(d1, assign_domains(3, 16, 16, np.array([0.2, 0.3, 0.5])))
    # step 1 continues each domain where step 0 left it
    for d in range(3):
        assert p1[d1 == d].tolist() == list(range((d0 == d).sum(), (d0 == d).sum() + (d1 == d).sum()))
    assert stream.draw(0)[1] is p0  # the same draw, not a new one
    assert stream.steps_drawn_ahead == 2 and stream.cursors.tolist() == [0, 0, 0]
    stream.complete(0)
    assert stream.cursors.tolist() == np.bincount(d0, minlength=3).tolist()
    assert stream.completed_steps == 1 and stream.steps_drawn_ahead == 1
    with pytest.raises(ValueError, match="global batch 0 requested out of order: the next one to generate is 2"):
        stream.draw(0)
    with pytest.raises(ValueError, match=r"step_end\(3\) out of order: expected step 1"):
        stream.complete(3)


def test_stream_completes_undrawn_steps_and_restores():
    """A rank without a data loader completes steps it never drew: the cursors advance the same."""
    with_loader, without = _stream(), _stream()
    for step in range(4):
        with_loader.draw(step)
        with_loader.complete(step)
        without.complete(step)
    assert with_loader.cursors.tolist() == without.cursors.tolist()
    restored = _stream()
    restored.restore(4, with_loader.cursors)
    for stream in (with_loader, restored):
        stream.draw(4)
    np.testing.assert_array_equal(with_loader.draw(4)[1], restored.draw(4)[1])


def test_stream_asks_for_the_weights_of_each_step_it_draws():
    asked = []
    stream = _stream(lambda step: asked.append(step) or np.array([1.0, 0.0, 0.0]))
    stream.draw(0)
    stream.draw(0)
    stream.draw(1)
    assert asked == [0, 1]


def test_prefetch_arithmetic():
    assert prefetch_steps_ahead(0, None, 4) == 0  # no workers: the batch is made when needed
    assert prefetch_steps_ahead(2, 2, 1) == 4  # 4 micro-batches in flight, 1 per step
    assert prefetch_steps_ahead(2, 2, 4) == 1  # (4 - 1 + 4) // 4
    assert prefetch_steps_ahead(1, None, 3) == 1  # DataLoader's default prefetch factor 2
    validate_prefetch(2, 2, 4, lag=1)
    with pytest.raises(ValueError, match="reaches 4 steps ahead but the mixing lag is 2; use --odm-lag 4"):
        validate_prefetch(2, 2, 1, lag=2)
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        prefetch_steps_ahead(1, 2, 0)


# -- FeedbackWindow ------------------------------------------------------------------------------
def _add(window, domain, loss, tokens=2):
    window.add(torch.full((1, tokens), loss), torch.ones(1, tokens), torch.tensor([domain]))


def test_window_closes_with_the_restored_part_and_reopens():
    window = FeedbackWindow(2)
    window.restore(start=6, totals=np.array([[LOSS_SCALE, 0], [1, 0], [0, 0]]))
    _add(window, 1, 0.5)
    totals = window.close(next_start=9)
    assert totals.tolist() == [[LOSS_SCALE, LOSS_SCALE], [1, 2], [0, 0]]
    assert window.start == 9
    assert window.close(next_start=10).tolist() == [[0, 0]] * NUM_STATS  # nothing carried over


def test_window_checkpoint_keeps_completed_steps_only():
    """The rerun case: losses of a step without step_done() stay out of the checkpoint's totals."""
    window = FeedbackWindow(2)
    _add(window, 0, 1.0)
    window.step_done()
    _add(window, 0, 3.0)  # the step being trained when the checkpoint is taken
    assert window.completed_totals(5).tolist() == [[2 * LOSS_SCALE, 0], [2, 0], [0, 0]]
    assert window.close(next_start=6).tolist() == [[8 * LOSS_SCALE, 0], [4, 0], [0, 0]]  # all of it
    _add(window, 1, 1.0)  # a new window with no completed step yet: nothing to save
    assert window.completed_totals(6).tolist() == [[0, 0]] * NUM_STATS
