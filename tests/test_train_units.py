"""Unit tests of the training pieces that need no process group: LR schedule, checkpoint
discovery, the CPU RNG tracker, argument validation, prior resolution, eval window dealing."""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

from odm_megatron.config import resolve_prior
from odm_megatron.training import checkpoint as ckpt
from odm_megatron.training.arguments import ConfigError, add_arguments, parse_data_path, validate_args
from odm_megatron.training.cpu_shims import CpuRNGStatesTracker
from odm_megatron.training.data import domain_name_from_prefix
from odm_megatron.training.evaluate import _rank_chunks, eval_windows
from odm_megatron.training.optim import LRSchedule


def _parse(argv, world_size=1, have_gpu=False):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return validate_args(parser.parse_args(argv), world_size=world_size, have_gpu=have_gpu)


def test_lr_schedule_warmup_cosine_and_resume():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, lr=1.0, min_lr=0.1, warmup=4, decay_iters=20)
    lrs = []
    for _ in range(22):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[19] == pytest.approx(0.1) and lrs[21] == pytest.approx(0.1)
    mid = 0.1 + 0.5 * (math.cos(math.pi * 0.5) + 1) * 0.9
    assert lrs[11] == pytest.approx(mid)
    other = LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 0.1, 4, 20)
    other.load_state_dict(sched.state_dict())
    assert other.current_lr == sched.current_lr


def _fake_checkpoint(root, iteration, complete=True, corrupt=False):
    d = ckpt.iteration_dir(root, iteration)
    os.makedirs(d)
    for name in ("model.pt", ckpt.MIXER_FILE):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x" * 100)
    if complete:
        files = {name: {"size": 100, "sha256": ckpt.file_sha256(os.path.join(d, name))}
                 for name in ("model.pt", ckpt.MIXER_FILE)}
        meta = {"format": ckpt.CHECKPOINT_FORMAT, "version": ckpt.CHECKPOINT_VERSION, "iteration": iteration,
                "files": files}
        with open(os.path.join(d, ckpt.METADATA), "w") as f:
            json.dump(meta, f)
    if corrupt:
        with open(os.path.join(d, "model.pt"), "wb") as f:
            f.write(b"x" * 10)


def test_find_latest_checkpoint_skips_incomplete_and_corrupt(tmp_path):
    root = str(tmp_path)
    assert ckpt.find_latest_checkpoint(root) is None
    _fake_checkpoint(root, 10)
    _fake_checkpoint(root, 20)
    _fake_checkpoint(root, 30, complete=False)  # killed before metadata
    _fake_checkpoint(root, 40, corrupt=True)  # a file truncated after the fact
    os.makedirs(os.path.join(root, "iter_0000050.tmp-abc"))  # killed mid-write
    assert ckpt.find_latest_checkpoint(root) == 20
    with open(os.path.join(root, ckpt.TRACKER), "w") as f:
        f.write("10")
    assert ckpt.find_latest_checkpoint(root) == 20  # the newest intact one, not the (lagging) tracker
    with open(os.path.join(root, ckpt.TRACKER), "w") as f:
        f.write("40")
    assert ckpt.find_latest_checkpoint(root) == 20  # ... and ignored when it names a bad one


def test_cpu_rng_tracker_forks_like_megatrons():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # outer stream untouched
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the named stream advanced
    fresh = CpuRNGStatesTracker()
    fresh.add("model-parallel-rng", 123)
    with fresh.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), a)
    saved = tracker.get_states()
    with tracker.fork("model-parallel-rng"):
        c = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), c)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 123)


def test_validate_args_defaults_and_errors(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    args = _parse(["--manifest", str(manifest), "--train-iters", "10", "--micro-batch-size", "2"], world_size=4)
    assert args.global_batch_size == 8 and args.num_microbatches == 1 and args.data_parallel_size == 4
    assert args.max_position_embeddings == args.seq_length and args.lr_decay_iters == 10
    assert args.eval_interval == 1
    args = _parse(["--manifest", str(manifest), "--train-iters", "10", "--micro-batch-size", "2",
                   "--global-batch-size", "16", "--tensor-model-parallel-size", "2"], world_size=4, have_gpu=True)
    assert args.data_parallel_size == 2 and args.num_microbatches == 4
    with pytest.raises(ConfigError, match="not divisible by tensor x pipeline"):
        _parse(["--manifest", str(manifest), "--train-iters", "1", "--tensor-model-parallel-size", "3"],
               world_size=4, have_gpu=True)
    with pytest.raises(ConfigError, match="exceeds --max-position-embeddings"):
        _parse(["--manifest", str(manifest), "--train-iters", "1", "--seq-length", "64",
                "--max-position-embeddings", "32"])
    with pytest.raises(ConfigError, match="needs --vocab-size"):
        _parse(["--data-path", "1", "a", "--train-iters", "1"])
    assert parse_data_path(["a"]) == ([1.0], ["a"])
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == ([0.3, 0.7], ["a", "b"])
    with pytest.raises(ConfigError, match="is not a weight"):
        parse_data_path(["a", "b"])


def test_priors_and_domain_names(tmp_path):
    names = ["code", "web"]
    assert resolve_prior("natural", names, np.array([1.0, 3.0])).tolist() == [0.25, 0.75]
    assert resolve_prior("uniform", names, np.array([1.0, 3.0])).tolist() == [0.5, 0.5]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"weights": {"web": 1, "code": 4}}))
    assert resolve_prior(str(path), names, np.ones(2)).tolist() == [0.8, 0.2]
    path.write_text(json.dumps({"web": 1, "books": 1}))
    with pytest.raises(ConfigError, match="missing \\['code'\\], unknown \\['books'\\]"):
        resolve_prior(str(path), names, np.ones(2))
    assert domain_name_from_prefix("/data/pile/github_text_document") == "github"
    assert domain_name_from_prefix("/data/wiki") == "wiki"


def test_eval_windows_are_dealt_without_overlap():
    n = eval_windows(1000, eval_iters=2, global_batch_size=8)
    assert n == 16 and eval_windows(5, 2, 8) == 5
    for dp in (1, 2, 3):
        chunks = [c for r in range(dp) for c in _rank_chunks(n, 3, r, dp)]
        flat = sorted(i for c in chunks for i in c)
        assert flat == list(range(n))


def _tb_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(log_dir, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_logger_writes_tensorboard_scalars_and_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from odm_megatron.training.metrics import MetricsLogger

    names = ["code", "web"]
    log = MetricsLogger(str(tmp_path), enabled=True, domain_names=names)
    for step in (1, 2, 3):
        log.log_train(step, loss=5.0 - step, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0, step_time=0.1)
        log.log_mixture({"step": step, "weights": {"code": 0.25 * step / 3, "web": 1 - 0.25 * step / 3}})
    log.log_eval({"step": 3, "domains": {"code": {"loss": 1.0, "ppl": math.e}, "web": {"loss": 2.0, "ppl": math.e ** 2}},
                  "average": {"loss": 1.5, "ppl": (math.e + math.e ** 2) / 2}})
    log.close()
    scalars = _tb_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["train/loss"][-1][1] == pytest.approx(2.0)
    assert scalars["mixture/weight/web"][0][1] == pytest.approx(1 - 0.25 / 3)
    assert scalars["eval/ppl/web"] == [(3, pytest.approx(math.e ** 2))]
    assert "eval/ppl/average" in scalars and "eval/loss/code" in scalars

    # resuming at step 1 (the run died after step 3 but the checkpoint is at 1): steps 2-3 are
    # purged from TensorBoard like from the JSONL logs, and the rewritten ones take their place
    log = MetricsLogger(str(tmp_path), enabled=True, domain_names=names, resume_step=1)
    log.log_train(2, loss=7.0, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0, step_time=0.1)
    log.close()
    losses = _tb_scalars(tmp_path)["train/loss"]
    assert [s for s, _ in losses] == [1, 2] and losses[-1][1] == pytest.approx(7.0)
    with open(tmp_path / "train.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
