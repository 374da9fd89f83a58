"""The online mixer: lag, cursors (no repeats, no skips), resume, prefetch guard, errors."""
import numpy as np
import pytest
import torch

from core_fixtures import EOD, VOCAB_SIZE, make_domains
from mixer_helpers import make_mixer, synthetic_loss, train_synthetic
from odm_megatron.dataset import OnlineBlendedDataset, TokenizerSpec, build_domain_datasets, make_gpt_dataset_config
from odm_megatron.mixer import PrefetchTooDeepError
from odm_megatron.sampler import OnlineMixingBatchSampler
from odm_megatron.state import BanditState, BanditStateError


def test_weights_take_effect_after_the_lag():
    script = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    mixer = make_mixer([100, 100, 100], policy="test-scripted", interval=3, lag=2, script=script)
    out = train_synthetic(mixer, range(0, 14), micro_batch_size=4)
    # update u happens after step 3u-1 and is in force from step 3u + 2
    for step, (domains, _) in enumerate(out["global"]):
        if step < 5:
            continue  # the uniform prior
        expected = 0 if step < 8 else 1 if step < 11 else 2
        assert set(domains.tolist()) == {expected}, step
    assert len(set(out["global"][0][0].tolist())) > 1


def test_no_repeat_or_skip_within_a_domain_under_extreme_weights(tmp_path):
    prefixes = make_domains(str(tmp_path), [6, 3, 9])
    config = make_gpt_dataset_config(seed=5, seq_length=16, tokenizer=TokenizerSpec(VOCAB_SIZE, EOD),
                                     path_to_cache=str(tmp_path / "cache"))
    dataset = OnlineBlendedDataset(build_domain_datasets(prefixes, config), seed=5)
    n = dataset.num_samples_per_domain
    e = 1e-6
    script = [[1 - 2 * e, e, e], [e, 1 - 2 * e, e], [e, e, 1 - 2 * e], [1 / 3, 1 / 3, 1 / 3]] * 3
    mixer = make_mixer(n.tolist(), policy="test-scripted", gbs=8, interval=4, lag=1, seed=5, script=script)
    out = train_synthetic(mixer, range(0, 60), micro_batch_size=8)
    served = {d: [] for d in range(3)}
    for keys in out["keys"]:
        for dataset_id, position in keys:
            served[dataset_id].append((position, dataset.sample_index(dataset_id, position)))
            item = dataset[(dataset_id, position)]
            assert item["dataset_id"] == dataset_id
    for d, pairs in served.items():
        positions = [p for p, _ in pairs]
        assert positions == list(range(len(positions))), "cursor skipped or repeated a position"
        assert len(positions) > 2 * n[d], "test should cross several epochs of every domain"
        indices = [i for _, i in pairs]
        for start in range(0, len(indices) - n[d] + 1, n[d]):
            assert sorted(indices[start:start + n[d]]) == list(range(n[d])), f"domain {d} epoch at {start}"
        partial = indices[len(indices) - len(indices) % n[d]:]
        assert len(set(partial)) == len(partial)
    np.testing.assert_array_equal(mixer.cursors, [len(served[d]) for d in range(3)])


@pytest.mark.parametrize("policy", ["odm-exp3", "smoothed-mean", "odm-progress"])
@pytest.mark.parametrize("save_at", [7, 8])  # mid-window and at a window boundary
def test_save_load_continue_is_identical(tmp_path, policy, save_at):
    sizes = [13, 5, 40, 9]
    reference = train_synthetic(make_mixer(sizes, policy=policy, interval=3, lag=2), range(0, 30), micro_batch_size=2)

    first = make_mixer(sizes, policy=policy, interval=3, lag=2)
    head = train_synthetic(first, range(0, 30), micro_batch_size=2, stop_before=save_at)
    first.save(str(tmp_path / "bandit.json"))
    state_dict = first.state_dict()

    resumed = make_mixer(sizes, policy=policy, interval=3, lag=2)
    resumed.load(str(tmp_path / "bandit.json"))
    tail = train_synthetic(resumed, range(save_at, 30), micro_batch_size=2)
    via_dict = make_mixer(sizes, policy=policy, interval=3, lag=2)
    via_dict.load_state_dict(state_dict)
    tail2 = train_synthetic(via_dict, range(save_at, 30), micro_batch_size=2)

    for run in (tail, tail2):
        assert len(head["global"]) + len(run["global"]) == 30
        for (d1, p1), (d2, p2) in zip(reference["global"], head["global"] + run["global"]):
            np.testing.assert_array_equal(d1, d2)
            np.testing.assert_array_equal(p1, p2)
        for w1, w2 in zip(reference["weights"], head["weights"] + run["weights"]):
            np.testing.assert_array_equal(w1, w2)
        recs = head["records"] + run["records"]
        assert len(recs) == len(reference["records"]) == 10
        for a, b in zip(reference["records"], recs):
            assert a[0] == b[0]
            for x, y in zip(a[1:], b[1:]):
                np.testing.assert_array_equal(x, y)
    assert not np.allclose(reference["weights"][-1], 0.25), "the policy should have moved"


@pytest.mark.parametrize("save_at", [7, 8])
def test_save_in_the_middle_of_a_step_leaves_that_step_out(tmp_path, save_at):
    """Megatron's rerun state machine checkpoints after a suspicious step's forward-backward and
    before its step_end, then the next job re-runs that step: the resumed run must match an
    uninterrupted one, so the aborted step's losses must not be in the saved window."""
    sizes = [13, 5, 40, 9]
    reference = train_synthetic(make_mixer(sizes, interval=3, lag=2), range(0, 20), micro_batch_size=2)

    first = make_mixer(sizes, interval=3, lag=2)
    train_synthetic(first, range(0, 20), micro_batch_size=2, stop_before=save_at)
    between_steps = first.state_dict()
    domains, positions = first.draw_global_batch(save_at)  # the aborted step: losses in, no step_end
    first.accumulate(*synthetic_loss(list(zip(domains.tolist(), positions.tolist()))))
    mid_step = first.state_dict()
    assert mid_step == between_steps

    resumed = make_mixer(sizes, interval=3, lag=2)
    resumed.load_state_dict(mid_step)
    tail = train_synthetic(resumed, range(save_at, 20), micro_batch_size=2)
    for w1, w2 in zip(reference["weights"][save_at:], tail["weights"]):
        np.testing.assert_array_equal(w1, w2)
    assert reference["records"][-1][0] == tail["records"][-1][0]
    np.testing.assert_array_equal(reference["records"][-1][1], tail["records"][-1][1])


def test_loading_a_state_from_another_run_names_the_difference(tmp_path):
    mixer = make_mixer([10, 10, 10], names=["web", "code", "books"])
    train_synthetic(mixer, range(0, 4), micro_batch_size=4)
    state = mixer.state_dict()
    with pytest.raises(BanditStateError, match=r"not in this run: \['books'\]"):
        make_mixer([10, 10, 10], names=["web", "code", "math"]).load_state_dict(state)
    with pytest.raises(BanditStateError, match="seed 11, this run uses seed 12"):
        make_mixer([10, 10, 10], names=["web", "code", "books"], seed=12).load_state_dict(state)
    with pytest.raises(BanditStateError, match="code: state 10, run 11"):
        make_mixer([10, 11, 10], names=["web", "code", "books"]).load_state_dict(state)
    with pytest.raises(BanditStateError, match="global batch size 8, this run uses 16"):
        make_mixer([10, 10, 10], names=["web", "code", "books"], gbs=16).load_state_dict(state)
    with pytest.raises(BanditStateError, match="policy 'odm-exp3', this run uses 'static'"):
        make_mixer([10, 10, 10], names=["web", "code", "books"], policy="static").load_state_dict(state)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(BanditStateError, match="not a valid bandit state"):
        BanditState.load(str(tmp_path / "junk.json"))


def test_prefetch_deeper_than_lag_fails_clearly(tmp_path):
    prefixes = make_domains(str(tmp_path), [6, 6])
    config = make_gpt_dataset_config(seed=1, seq_length=16, tokenizer=TokenizerSpec(VOCAB_SIZE, EOD),
                                     path_to_cache=str(tmp_path / "cache"))
    dataset = OnlineBlendedDataset(build_domain_datasets(prefixes, config), seed=1)

    def run(lag, num_workers):
        mixer = make_mixer(dataset.num_samples_per_domain.tolist(), gbs=4, interval=2, lag=lag, seed=1)
        sampler = OnlineMixingBatchSampler(mixer, 12 * 4, 0, micro_batch_size=4, data_parallel_rank=0,
                                           data_parallel_size=1)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             prefetch_factor=2 if num_workers else None)
        tokens = []
        for step, batch in enumerate(loader):
            tokens.append(batch["tokens"])
            keys = list(zip(batch["dataset_id"].tolist(), [0] * 4))
            loss, mask, ids = synthetic_loss(keys)
            mixer.accumulate(loss[:, :8], mask[:, :8], batch["dataset_id"])
            mixer.step_end(step)
        return torch.stack(tokens), mixer

    with pytest.raises(ValueError, match="use --odm-lag 4"):
        make_mixer([6, 6], lag=1).validate_prefetch(num_workers=2, prefetch_factor=2, num_microbatches=1)
    make_mixer([6, 6], lag=4).validate_prefetch(num_workers=2, prefetch_factor=2, num_microbatches=1)
    make_mixer([6, 6], lag=1).validate_prefetch(num_workers=2, prefetch_factor=2, num_microbatches=4)
    with pytest.raises(PrefetchTooDeepError, match="Prefetching deeper than the lag"):
        run(lag=1, num_workers=2)
    serial, _ = run(lag=4, num_workers=0)
    prefetched, _ = run(lag=4, num_workers=2)
    assert torch.equal(serial, prefetched)


def test_ranks_micro_batches_partition_the_global_batch():
    world = 4
    mixers = [make_mixer([30, 7, 50], gbs=16) for _ in range(world)]
    outs = [train_synthetic(m, range(0, 6), micro_batch_size=2, rank=r, world_size=world) for r, m in enumerate(mixers)]
    for step in range(6):
        domains, positions = outs[0]["global"][step]
        per_rank = [out["keys"][step * 2:(step + 1) * 2] for out in outs]  # 2 micro-batches per step
        rebuilt = []
        for m in range(2):
            for r in range(world):
                rebuilt.extend(per_rank[r][m])
        assert rebuilt == list(zip(domains.tolist(), positions.tolist()))


def test_sampler_rejects_bad_layouts():
    mixer = make_mixer([5, 5], gbs=8)
    with pytest.raises(ValueError, match="not divisible by micro batch size 3"):
        OnlineMixingBatchSampler(mixer, 80, 0, micro_batch_size=3, data_parallel_rank=0, data_parallel_size=1)
    with pytest.raises(ValueError, match="not a multiple of the global batch size"):
        OnlineMixingBatchSampler(mixer, 80, 4, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2)
    with pytest.raises(ValueError, match="out of order"):
        mixer.draw_global_batch(3)
    with pytest.raises(ValueError, match="out of order"):
        mixer.step_end(2)


def _tokens_by_step(out, steps, k):
    """Per-domain token counts of each step's global batch, from the synthetic losses' masks."""
    counts = {}
    for step, (domains, positions) in zip(steps, out["global"]):
        _, mask, ids = synthetic_loss(list(zip(domains.tolist(), positions.tolist())))
        counts[step] = np.bincount(ids.numpy(), weights=mask.sum(dim=1).numpy(), minlength=k).astype(np.int64)
    return counts


@pytest.mark.parametrize("old, new", [(1, 3), (3, 1), (2, 5)])
def test_resume_with_another_update_interval(tmp_path, caplog, old, new):
    """Issue 11 problem 8: --update-interval changed on resume (1 -> 3 used to crash with "weights
    for step 18 were discarded"). The open window keeps its start and closes `new` steps after it;
    each update sees exactly its window's tokens (the restored part included) and the mean of the
    weights that drew them; the sample stream goes on without a repeat or a skip."""
    sizes, save_at, end = [13, 5, 40, 9], 19, 31
    first = make_mixer(sizes, interval=old, lag=2)
    head = train_synthetic(first, range(0, end), micro_batch_size=2, stop_before=save_at)
    first.save(str(tmp_path / "bandit.json"))
    window_start = save_at - save_at % old  # updates so far at multiples of `old`

    resumed = make_mixer(sizes, interval=new, lag=2)
    with caplog.at_level("WARNING"):
        resumed.load(str(tmp_path / "bandit.json"))
    assert f"resuming with update_interval={new} (state has {old})" in caplog.text
    recording = make_mixer(sizes, interval=new, lag=2)  # the same run, recording what the windows saw
    recording.load(str(tmp_path / "bandit.json"))
    tail = train_synthetic(resumed, range(save_at, end), micro_batch_size=2)

    tokens = _tokens_by_step(head, range(0, save_at), 4)
    tokens.update(_tokens_by_step(tail, range(save_at, end), 4))
    weights = dict(enumerate(head["weights"]))
    weights.update(zip(range(save_at, end), tail["weights"]))
    # the window closes `new` steps after its start, or at the first step after the resume
    expected_ends = list(range(max(window_start + new, save_at + 1) - 1, end, new))
    assert [r[0] for r in tail["records"]] == expected_ends
    start = window_start
    for step, _, _, token_counts in tail["records"]:
        np.testing.assert_array_equal(token_counts, sum(tokens[s] for s in range(start, step + 1)))
        start = step + 1
    # the first window's sampling probabilities: the weights of its steps, before and after the resume
    domains, positions = recording.draw_global_batch(save_at)
    for s in range(save_at, expected_ends[0] + 1):
        if s > save_at:
            domains, positions = recording.draw_global_batch(s)
        recording.accumulate(*synthetic_loss(list(zip(domains.tolist(), positions.tolist()))))
        record = recording.step_end(s)
    np.testing.assert_allclose(record.sampling_probs,
                               np.mean([weights[s] for s in range(window_start, expected_ends[0] + 1)], axis=0),
                               rtol=0, atol=1e-15)
    # no sample repeated or skipped across the resume
    served = {d: [] for d in range(4)}
    for keys in head["keys"] + tail["keys"]:
        for d, p in keys:
            served[d].append(p)
    for d, positions in served.items():
        assert positions == list(range(len(positions)))
    for w in tail["weights"]:
        assert np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("interval, old, new", [(1, 3, 0), (2, 3, 1), (2, 2, 0), (1, 0, 3)])
def test_resume_with_another_lag(tmp_path, interval, old, new):
    """A shorter lag makes a new decision land at or before one made under the longer lag: the
    newer one wins from its step on, and every step samples with the decision in force at it."""
    sizes, save_at, end = [13, 5, 40, 9], 10, 24
    first = make_mixer(sizes, interval=interval, lag=old)
    train_synthetic(first, range(0, end), micro_batch_size=2, stop_before=save_at)
    state = first.state_dict()
    resumed = make_mixer(sizes, interval=interval, lag=new)
    resumed.load_state_dict(state)
    tail = train_synthetic(resumed, range(save_at, end), micro_batch_size=2)
    assert len(tail["records"]) == (end - save_at) // interval
    for i, step in enumerate(range(save_at, end)):
        np.testing.assert_array_equal(tail["weights"][i], _in_force(state["schedule"], tail["records"], new, step))


def _in_force(pending, records, lag, step):
    """The weights in force at ``step``, from the decisions known when it was drawn (after
    ``step_end(step - 1)``): the checkpoint's, then each update's, a newer one replacing older
    ones from its effective step on."""
    decisions = [(s, np.asarray(w)) for s, w in pending]
    for last_step, weights, _, _ in records:
        if last_step >= step:
            break  # decided after `step` was drawn
        effective = last_step + 1 + lag
        decisions = [(s, w) for s, w in decisions if s < effective] + [(effective, weights)]
    return [w for s, w in decisions if s <= step][-1]


def test_mixture_records_are_1_based():
    """mixture.jsonl counts iterations from 1, whichever front end writes it (issue 10 item 4)."""
    mixer = make_mixer([10, 10, 10], interval=3, lag=2, names=["a", "b", "c"])
    for step in range(3):
        domains, positions = mixer.draw_global_batch(step)
        mixer.accumulate(*synthetic_loss(list(zip(domains.tolist(), positions.tolist()))))
        record = mixer.step_end(step)
    assert (record.step, record.effective_step) == (2, 5)  # 0-based: step_end(2) ends the 3rd step
    line = record.to_json(["a", "b", "c"])
    assert (line["step"], line["effective_step"], line["update"]) == (3, 6, 1)
    assert set(line["weights"]) == {"a", "b", "c"}


def test_a_loader_iterator_recreated_after_a_step_is_refused():
    """A second iterator over the same sampler repeats the draw only until a step completes; after
    that it asks for a trained step and fails clearly. A new sampler from the completed steps goes on."""
    mixer = make_mixer([10, 10], gbs=4)
    sampler = OnlineMixingBatchSampler(mixer, 40, 0, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1)
    first = next(iter(sampler))
    assert next(iter(sampler)) == first  # nothing completed yet: the same draw again
    mixer.step_end(0)
    with pytest.raises(ValueError, match="out of order.*re-created"):
        next(iter(sampler))
    fresh = OnlineMixingBatchSampler(mixer, 40, mixer.completed_steps * 4, micro_batch_size=4, data_parallel_rank=0,
                                     data_parallel_size=1)
    domains, positions = mixer.draw_global_batch(1)
    assert next(iter(fresh)) == list(zip(domains.tolist(), positions.tolist()))


@pytest.mark.parametrize("save_again_at", [20, 21, 22, 23])
def test_resume_twice_after_an_interval_change_is_identical(save_again_at):
    """A run resumed with another interval, saved again (before or after its first update) and
    resumed: the same as the once-resumed run. The open window's start is recovered from the
    schedule (the last decision's step minus the lag), not from the interval, which changed."""
    sizes = [13, 5, 40, 9]
    first = make_mixer(sizes, interval=1, lag=2)
    train_synthetic(first, range(0, 30), micro_batch_size=2, stop_before=19)
    at_19 = first.state_dict()

    once = make_mixer(sizes, interval=3, lag=2)
    once.load_state_dict(at_19)
    reference = train_synthetic(once, range(19, 30), micro_batch_size=2)

    twice = make_mixer(sizes, interval=3, lag=2)
    twice.load_state_dict(at_19)
    head = train_synthetic(twice, range(19, 30), micro_batch_size=2, stop_before=save_again_at)
    again = make_mixer(sizes, interval=3, lag=2)
    again.load_state_dict(twice.state_dict())
    tail = train_synthetic(again, range(save_again_at, 30), micro_batch_size=2)

    assert len(reference["records"]) == len(head["records"] + tail["records"]) > 0
    for a, b in zip(reference["records"], head["records"] + tail["records"]):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(x, y)
    for w1, w2 in zip(reference["weights"], head["weights"] + tail["weights"]):
        np.testing.assert_array_equal(w1, w2)
    for (d1, p1), (d2, p2) in zip(reference["global"], head["global"] + tail["global"]):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(p1, p2)
