"""Checkpoints that cannot run code or lie (issue 11, problems 1-4 and 13), the bandit state's
checksum, per-rank logs across a data-parallel size change, and the fast fault-injection run.

The end-to-end tests train the tiny model of ``test_train.py`` for a few steps as subprocesses;
the rest reads a checkpoint of one module-scoped run in-process (no process group: a one-rank
:class:`ParallelEnv` needs none).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from odm_megatron.state import BanditState, BanditStateError
from odm_megatron.training import checkpoint as ckpt
from odm_megatron.training.parallel import ParallelEnv
from training_fixtures import REPO, TINY_MODEL, make_train_valid, read_jsonl, run_cli

ITERS = 9
_ONE_RANK = dict(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", tp_rank=0, tp_size=1,
                 pp_rank=0, pp_size=1, dp_rank=0, dp_size=1, cpu_shims=True)
ENV1 = ParallelEnv(**{f.name: _ONE_RANK[f.name] for f in dataclasses.fields(ParallelEnv) if f.name in _ONE_RANK})


def _train_args(corpus, log_dir, save, *extra, iters=ITERS):
    return ["train", "--manifest", corpus["train"], "--valid-manifest", corpus["valid"], *TINY_MODEL,
            "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--update-interval", "2",
            "--eval-interval", "3", "--log-interval", "3", "--log-dir", log_dir, "--no-tensorboard",
            "--save", save, "--save-interval", "3", *extra]


def _check(proc, what="run"):
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time")} for r in rows]


def _assert_same_logs(reference_logs, logs):
    for name in ("train.jsonl", "mixture.jsonl", "eval.jsonl"):
        a = _strip_timing(read_jsonl(os.path.join(reference_logs, name)))
        b = _strip_timing(read_jsonl(os.path.join(logs, name)))
        assert a == b, name


def _assert_same_model(ckpt_a, ckpt_b, iteration):
    def state(root):
        path = os.path.join(ckpt.iteration_dir(root, iteration), "model_optim_tp00_pp000.pt")
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

    a, b = state(ckpt_a), state(ckpt_b)
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_train_valid(str(tmp_path_factory.mktemp("ckpt_corpus")))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 9-step run with checkpoints at 3, 6 and 9."""
    root = str(tmp_path_factory.mktemp("ckpt_reference"))
    logs, save = os.path.join(root, "logs"), os.path.join(root, "ckpt")
    _check(run_cli(_train_args(corpus, logs, save)), "reference run")
    assert ckpt.list_checkpoints(save) == [9, 6, 3]
    return {"logs": logs, "ckpt": save}


def _copy_run(reference, dest, keep=(3, 6, 9)):
    """A copy of the reference run's checkpoints (only ``keep``) and logs."""
    save, logs = os.path.join(dest, "ckpt"), os.path.join(dest, "logs")
    shutil.copytree(reference["ckpt"], save)
    shutil.copytree(reference["logs"], logs)
    for it in ckpt.list_checkpoints(save):
        if it not in keep:
            shutil.rmtree(ckpt.iteration_dir(save, it))
    return save, logs


def _flip_bit(path, rng):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        f.seek(0)
        f.write(data)
    return i


# --- 1. nothing in a checkpoint is executed ------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _restamp(directory, name):
    """What an attacker who can write the directory does: make the metadata match the new file."""
    meta_path = os.path.join(directory, ckpt.METADATA)
    meta = json.load(open(meta_path))
    path = os.path.join(directory, name)
    meta["files"][name] = {"size": os.path.getsize(path), "sha256": ckpt.file_sha256(path)}
    json.dump(meta, open(meta_path, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
@pytest.mark.parametrize("restamped", [True, False])
def test_crafted_mixer_pt_never_runs_code(reference, tmp_path, how, restamped):
    save, _ = _copy_run(reference, str(tmp_path), keep=(6,))
    marker = tmp_path / "pwned"
    directory = ckpt.iteration_dir(save, 6)
    payload = {"format": "odm-megatron-bandit-state", "x": _Payload(str(marker))}
    with open(os.path.join(directory, ckpt.MIXER_FILE), "wb") as f:
        if how == "torch.save":
            torch.save(payload, f)
        else:
            pickle.dump(payload, f)
    if restamped:  # checksums pass: only weights_only stands between the file and os.system
        _restamp(directory, ckpt.MIXER_FILE)
    candidate, problems = ckpt.select_checkpoint(save, ENV1)
    assert candidate is None and len(problems) == 1
    assert ckpt.MIXER_FILE in problems[0]
    expected = ("does not load as plain data",) if restamped else ("sha256", "bytes")
    assert any(e in problems[0] for e in expected), problems
    assert not marker.exists(), "the checkpoint executed code"


def test_everything_written_loads_with_weights_only(reference):
    directory = ckpt.iteration_dir(reference["ckpt"], 9)
    meta = json.load(open(os.path.join(directory, ckpt.METADATA)))
    assert sorted(meta["files"]) == ["mixer.pt", "model_optim_tp00_pp000.pt", "rng_rank00000.pt"]
    for name in meta["files"]:
        torch.load(os.path.join(directory, name), weights_only=True)  # raises on anything but plain data
    rng = torch.load(os.path.join(directory, "rng_rank00000.pt"), weights_only=True)
    assert rng["numpy"]["name"] == "MT19937" and rng["numpy"]["keys"].shape == (624,)
    assert len(rng["python"]["state"]) == 625


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import numpy as np

    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()  # leaves a cached gaussian
    state = {k: v for k, v in ckpt.rng_state().items() if k != "tracker"}
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    loaded["tracker"] = ckpt.rng_state()["tracker"]
    ckpt.set_rng_state(loaded)
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_no_weights_only_false_anywhere():
    hits = []
    needle = "weights_only=" + "False"
    for top in ("odm_megatron", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        if needle in f.read():
                            hits.append(os.path.join(dirpath, name))
    assert not hits, hits


# --- 2/3. checksums and fallback -------------------------------------------------------------------

def test_twenty_random_bit_flips_are_all_detected_and_fall_back(reference, tmp_path, caplog):
    """Size-only metadata let ~40% of single-bit flips load with other contents (issue 11)."""
    save, _ = _copy_run(reference, str(tmp_path / "run"), keep=(6, 9))
    newest = ckpt.iteration_dir(save, 9)
    rng = random.Random(11)
    for trial in range(20):
        name = (ckpt.MIXER_FILE, "model_optim_tp00_pp000.pt", "rng_rank00000.pt")[trial % 3 if trial < 18 else 0]
        path = os.path.join(newest, name)
        pristine = open(path, "rb").read()
        offset = _flip_bit(path, rng)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="odm_megatron.training.checkpoint"):
            candidate, problems = ckpt.select_checkpoint(save, ENV1)
        assert candidate is not None and candidate.meta["iteration"] == 6, (name, offset)
        assert problems == [f"{newest}: {name} fails its sha256 check (corrupt)"], (name, offset, problems)
        assert name in caplog.text and "skipping checkpoint" in caplog.text
        with open(path, "wb") as f:
            f.write(pristine)
    candidate, problems = ckpt.select_checkpoint(save, ENV1)
    assert candidate.meta["iteration"] == 9 and problems == []


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "has 10 bytes"),
    ("delete", "mixer.pt missing"),
    ("metadata", "metadata.json unreadable"),
    ("no-metadata", "metadata.json missing"),
    ("version1", "format version 1"),
])
def test_each_kind_of_damage_is_named(reference, tmp_path, damage, reason):
    save, _ = _copy_run(reference, str(tmp_path), keep=(6, 9))
    directory = ckpt.iteration_dir(save, 9)
    meta_path = os.path.join(directory, ckpt.METADATA)
    if damage == "truncate":
        with open(os.path.join(directory, "rng_rank00000.pt"), "r+b") as f:
            f.truncate(10)
    elif damage == "delete":
        os.remove(os.path.join(directory, ckpt.MIXER_FILE))
    elif damage == "metadata":
        with open(meta_path, "r+b") as f:
            f.seek(0)
            f.write(b"\xff\xfe{")
    elif damage == "no-metadata":
        os.remove(meta_path)
    else:
        meta = json.load(open(meta_path))
        meta["version"] = 1
        json.dump(meta, open(meta_path, "w"))
    candidate, problems = ckpt.select_checkpoint(save, ENV1)
    assert candidate.meta["iteration"] == 6
    assert len(problems) == 1 and problems[0].startswith(directory) and reason in problems[0], problems


def test_corrupt_newest_checkpoint_resumes_from_older_bit_identically(corpus, reference, tmp_path):
    """A flipped bit in the newest mixer.pt: WARNING, resume from the older one, same run."""
    save, logs = _copy_run(reference, str(tmp_path), keep=(3, 6))
    _flip_bit(os.path.join(ckpt.iteration_dir(save, 6), ckpt.MIXER_FILE), random.Random(5))
    proc = run_cli(_train_args(corpus, logs, save, "--load", save))
    _check(proc, "resume past a corrupt checkpoint")
    assert "skipping checkpoint" in proc.stderr and "mixer.pt fails its sha256 check" in proc.stderr
    assert "resumed from" in proc.stderr and "iter_0000003" in proc.stderr
    _assert_same_logs(reference["logs"], logs)
    _assert_same_model(reference["ckpt"], save, ITERS)
    # resuming the finished run changes nothing (the final evaluation is not logged twice)
    _check(run_cli(_train_args(corpus, logs, save, "--load", save)), "resume of a finished run")
    _assert_same_logs(reference["logs"], logs)


def test_no_usable_checkpoint_stops_and_keeps_the_logs(corpus, reference, tmp_path):
    save, logs = _copy_run(reference, str(tmp_path))
    with open(os.path.join(ckpt.iteration_dir(save, 3), ckpt.MIXER_FILE), "r+b") as f:
        f.truncate(5)
    os.remove(os.path.join(ckpt.iteration_dir(save, 6), ckpt.METADATA))
    _flip_bit(os.path.join(ckpt.iteration_dir(save, 9), "model_optim_tp00_pp000.pt"), random.Random(1))
    before = {n: open(os.path.join(logs, n), "rb").read() for n in os.listdir(logs)}
    proc = run_cli(_train_args(corpus, logs, save, "--load", save, iters=12))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr[proc.stderr.index("odm-megatron train: error:"):].strip().splitlines()
    assert "3 checkpoint(s) and none can be used" in err[0]
    assert len(err) == 4, err
    assert "iter_0000009: model_optim_tp00_pp000.pt fails its sha256 check" in err[1]
    assert "iter_0000006: metadata.json missing" in err[2]
    assert "iter_0000003: mixer.pt has 5 bytes" in err[3]
    assert {n: open(os.path.join(logs, n), "rb").read() for n in os.listdir(logs)} == before
    assert ckpt.list_checkpoints(save) == [9, 6, 3]


# --- 3. a fresh start never overwrites an earlier run ------------------------------------------------

def _ns(**kw):
    import argparse

    return argparse.Namespace(**{"save": None, "load": None, "log_dir": None, **kw})


def test_fresh_start_into_an_earlier_run_is_refused(reference, tmp_path):
    problem = ckpt._fresh_start_problem(_ns(save=reference["ckpt"], log_dir=str(tmp_path / "new")))
    assert f"--save {reference['ckpt']} already holds checkpoints" in problem and "iter_0000009" in problem
    problem = ckpt._fresh_start_problem(_ns(save=str(tmp_path / "new"), log_dir=reference["logs"]))
    assert f"--log-dir {reference['logs']} already holds the logs" in problem and "step 9" in problem
    # a --load that points elsewhere does not make a fresh start into a run's --save acceptable
    problem = ckpt._fresh_start_problem(_ns(save=reference["ckpt"], load=str(tmp_path / "empty")))
    assert "already holds checkpoints" in problem
    # an empty log dir, or one whose train.jsonl has no step yet, is no earlier run
    (tmp_path / "empty_logs").mkdir()
    (tmp_path / "empty_logs" / "train.jsonl").write_text("")
    assert ckpt._fresh_start_problem(_ns(log_dir=str(tmp_path / "empty_logs"))) is None


def test_fresh_start_cli_refusal_leaves_the_run_untouched(corpus, reference, tmp_path):
    save, logs = _copy_run(reference, str(tmp_path))
    before = open(os.path.join(logs, "train.jsonl"), "rb").read()
    proc = run_cli(_train_args(corpus, logs, str(tmp_path / "other_save")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"odm-megatron train: error: --log-dir {logs} already")
    assert open(os.path.join(logs, "train.jsonl"), "rb").read() == before


def test_load_without_any_checkpoint_starts_over_and_keeps_the_old_logs(tmp_path, caplog):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (logs / "sample_order_rank1.jsonl").write_text('{"step": 1}\n')
    args = _ns(load=str(tmp_path / "ckpt"), save=str(tmp_path / "ckpt"), log_dir=str(logs))
    with caplog.at_level(logging.WARNING, logger="odm_megatron.training.checkpoint"):
        assert ckpt.load_checkpoint(args.load, None, None, None, None, args, ENV1, []) == 0
        assert ckpt._fresh_start_problem(args) is None
    assert "no checkpoint in --load" in caplog.text and "starting from scratch" in caplog.text
    names = sorted(os.listdir(logs))
    assert "train.jsonl" not in names and "sample_order_rank1.jsonl" not in names
    kept = [n for n in names if n.startswith("train.jsonl.before-restart-")]
    assert len(kept) == 1 and (logs / kept[0]).read_text().count("step") == 2


# --- 13. a kill between the directory's rename and the tracker update ------------------------------

KILL_BEFORE_TRACKER = r"""
import os, signal, sys
import odm_megatron.training.checkpoint as ckpt
real = ckpt._fsync_dir
def dying_fsync(path):
    real(path)
    # the fsync of --save right after iter_0000006 was renamed into place, before the tracker moved
    tracker = os.path.join(path, ckpt.TRACKER)
    if (os.path.isdir(os.path.join(path, "iter_0000006")) and os.path.isfile(tracker)
            and open(tracker).read() == "3"):
        os.kill(os.getpid(), signal.SIGKILL)
ckpt._fsync_dir = dying_fsync
from odm_megatron.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_between_rename_and_tracker_resumes_from_the_newest_complete(corpus, reference, tmp_path):
    logs, save = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    args = _train_args(corpus, logs, save)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_TRACKER, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert open(os.path.join(save, ckpt.TRACKER)).read() == "3"
    assert ckpt.list_checkpoints(save) == [6, 3]
    resumed = run_cli(args + ["--load", save])
    _check(resumed, "resume after the kill")
    assert "iter_0000006 (iteration 6)" in resumed.stderr, resumed.stderr[-2000:]
    assert "names iteration 3" in resumed.stderr
    _assert_same_logs(reference["logs"], logs)
    _assert_same_model(reference["ckpt"], save, ITERS)


# --- the bandit state's own checksum (JSON files of the Megatron-LM glue, DeepSpeed client_state) ---

def _bandit_state(steps=5):
    from mixer_helpers import make_mixer, train_synthetic

    mixer = make_mixer([13, 5, 40], interval=2, lag=1)
    if steps:
        train_synthetic(mixer, range(0, steps), micro_batch_size=2)
    return mixer


def test_bandit_state_file_checksum(tmp_path):
    mixer = _bandit_state()
    path = str(tmp_path / "iter_0000005.json")
    mixer.save(path)
    d = json.load(open(path))
    assert d["version"] == 2 and len(d["sha256"]) == 64
    BanditState.load(path)

    d["cursors"][0] += 1  # an edit (or a flip) that keeps the file valid JSON
    json.dump(d, open(path, "w"))
    with pytest.raises(BanditStateError, match=f"^{path}: bandit state checksum mismatch"):
        BanditState.load(path)

    rng = random.Random(2)
    original = mixer.state_dict()
    detected = 0
    for _ in range(30):  # single-bit flips anywhere: never a silent load of other contents
        mixer.save(path)
        _flip_bit(path, rng)
        try:
            loaded = BanditState.load(path)
        except BanditStateError as e:
            assert str(e).startswith(path) and "\n" not in str(e)
            detected += 1
        else:  # only a flip that leaves the parsed content identical (1e-05 -> 1E-05) may load
            assert loaded.to_dict() == original
    assert detected >= 28


def test_legacy_bandit_state_is_refused_until_stamped(tmp_path, capsys):
    from odm_megatron import state as state_mod

    mixer = _bandit_state()
    legacy = {k: v for k, v in mixer.state_dict().items() if k != "sha256"}
    legacy["version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(legacy))
    with pytest.raises(BanditStateError, match="version 1 has no checksum.*stamp"):
        BanditState.load(str(path))
    assert state_mod.main(["stamp", str(path)]) == 0
    assert BanditState.load(str(path)).cursors == legacy["cursors"]
    fresh = _bandit_state()
    fresh.load(str(path))
    assert fresh.state_dict() == mixer.state_dict()
    path.write_text("{not json")
    assert state_mod.main(["verify", str(path)]) == 1
    assert "not a valid bandit state" in capsys.readouterr().err


def test_bandit_state_dict_checksum_and_error_types():
    from odm_megatron.errors import CheckpointError

    mixer = _bandit_state()
    state = mixer.state_dict()
    state["schedule"][-1][1][0] = 1.5e-6  # issue 11: a flipped weight that no longer sums to 1
    with pytest.raises(BanditStateError, match="checksum mismatch") as info:
        _bandit_state().load_state_dict(state)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    del state["sha256"]
    with pytest.raises(BanditStateError, match="no sha256 checksum"):
        _bandit_state().load_state_dict(state)


def test_deepspeed_client_state_is_verified():
    """The DeepSpeed glue's load path refuses a corrupt bandit state, naming the checkpoint."""
    from odm_megatron.integrations import deepspeed as odm_ds

    mixer = _bandit_state()
    state = mixer.state_dict()
    state["cursors"][1] += 7

    class Engine:
        global_steps = 5

        def load_checkpoint(self, load_dir, tag=None, **kwargs):
            return os.path.join(load_dir, "global_step5"), {odm_ds.ODM_CLIENT_STATE_KEY: state}

    with pytest.raises(BanditStateError, match=r"global_step5.*checksum mismatch"):
        odm_ds.load_checkpoint(Engine(), "/ckpt", _bandit_state())


def test_megatron_lm_glue_refuses_a_corrupt_bandit_state_file(tmp_path):
    """``<save>/odm/iter_XXXXXXX.json``: Megatron-LM has already chosen the iteration, so there is
    nothing to fall back to: a clear error naming the file (never a silent load)."""
    import types

    from odm_megatron.errors import CheckpointError
    from odm_megatron.integrations.megatron_lm import glue

    mixer = _bandit_state()
    path = glue.state_path(str(tmp_path), mixer.completed_steps)
    mixer.save(path)
    args = types.SimpleNamespace(iteration=mixer.completed_steps, load=str(tmp_path), save=None,
                                 consumed_train_samples=None, global_batch_size=mixer.config.global_batch_size)
    text = open(path).read()
    assert '"completed_steps": 5' in text
    open(path, "w").write(text.replace('"completed_steps": 5', '"completed_steps": 4'))
    with pytest.raises(CheckpointError, match=r"iter_0000005\.json.*checksum mismatch") as info:
        glue._load_state_if_resuming(args, _bandit_state(steps=0))
    assert "\n" not in str(info.value)


# --- 5. per-rank logs across a data-parallel size change --------------------------------------------

def _global_order(log_dir, nproc, steps):
    """(step, domain, position) in global order for ``steps`` (rank r's micro-batch m is the
    (m * nproc + r)-th of the step)."""
    per_rank = [[r for r in read_jsonl(os.path.join(log_dir, f"sample_order_rank{k}.jsonl")) if r["step"] in steps]
                for k in range(nproc)]
    order = []
    for rows in zip(*per_rank):
        for row in rows:
            order += [(row["step"], d, p) for d, p in row["samples"]]
    return order


def test_data_parallel_size_change_leaves_no_stale_per_rank_lines(corpus, tmp_path):
    logs, save = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    args = ["train", "--manifest", corpus["train"], *TINY_MODEL[:-4], "--micro-batch-size", "2",
            "--make-vocab-size-divisible-by", "64", "--global-batch-size", "8", "--train-iters", "6",
            "--policy", "odm-exp3", "--update-interval", "2", "--odm-lag", "2", "--eval-interval", "0",
            "--log-dir", logs,
            "--no-tensorboard", "--log-sample-order", "--save", save, "--save-interval", "3"]
    _check(run_cli(args, nproc=2), "2 processes")
    original = _global_order(logs, 2, range(4, 7))
    shutil.rmtree(ckpt.iteration_dir(save, 6))  # as if killed before the save at 6

    # 2 -> 1: rank 1 no longer exists; its log must stop at the resume point
    _check(run_cli(args + ["--load", save]), "resume with 1 process")
    assert [r["step"] for r in read_jsonl(os.path.join(logs, "sample_order_rank1.jsonl"))] == [1, 1, 2, 2, 3, 3]
    assert [r["step"] for r in read_jsonl(os.path.join(logs, "mixture_rank1.jsonl"))] == [2]
    assert _global_order(logs, 1, range(4, 7)) == original  # same samples, same order

    # 1 -> 2: rank 1's log continues from the resume point, rank 0's is cut back to it
    shutil.rmtree(ckpt.iteration_dir(save, 6))
    _check(run_cli(args + ["--load", save], nproc=2), "resume with 2 processes")
    for k in range(2):
        steps = [r["step"] for r in read_jsonl(os.path.join(logs, f"sample_order_rank{k}.jsonl"))]
        assert steps == sorted(steps) and steps.count(3) == 2 and steps.count(4) == 2, (k, steps)
    assert _global_order(logs, 2, range(4, 7)) == original


# --- the fault-injection driver, fast mode ------------------------------------------------------------

def test_fault_injection_fast(tmp_path):
    """Three SIGKILLs at random points (in training, in a checkpoint write, between the rename and
    the tracker update), each followed by a resume: the final logs and model are bit-identical to
    an uninterrupted run."""
    out = tmp_path / "fi.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "fault_injection.py"), "--fast",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kills"] >= 3 and report["trials"] >= 1
    assert report["identical"] == report["trials"] and report["mismatched"] == 0
    assert {"training", "checkpoint-write", "after-rename"} <= set(report["kill_phases"])
