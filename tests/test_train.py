"""End-to-end tests of ``odm-megatron train`` on CPU: real megatron-core GPTModel, gloo, torchrun.

Runs are tiny (2 layers, hidden 64, seq 32) and run as subprocesses, as users run them. A
module-scoped reference run (24 steps, dropout on, a policy update every 3 steps, checkpoints
every 5) serves the loss, log-format, resume and crash tests.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from training_fixtures import (DOMAINS, REPO, TINY_MODEL, make_corpus, make_train_valid, read_jsonl,
                               run_cli)

ITERS = 24


def _train_args(corpus, log_dir, *extra):
    return ["train", "--manifest", corpus["train"], "--valid-manifest", corpus["valid"], *TINY_MODEL,
            "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3", "--lr-warmup-iters", "3",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--update-interval", "3",
            "--eval-interval", "8", "--log-interval", "8", "--log-dir", log_dir, *extra]


def _check(proc, what="run"):
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time")} for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_train_valid(str(tmp_path_factory.mktemp("train_corpus")))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run: 24 steps, checkpoints at 5, 10, 15, 20 and 24."""
    root = str(tmp_path_factory.mktemp("reference"))
    logs, ckpt = os.path.join(root, "logs"), os.path.join(root, "ckpt")
    proc = run_cli(_train_args(corpus, logs, "--save", ckpt, "--save-interval", "5"))
    _check(proc, "reference run")
    return {"logs": logs, "ckpt": ckpt, "proc": proc}


def _model_state(ckpt_dir, iteration):
    path = os.path.join(ckpt_dir, f"iter_{iteration:07d}", "model_optim_tp00_pp000.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_run(reference_logs, logs):
    for name in ("train.jsonl", "mixture.jsonl", "eval.jsonl"):
        a = _strip_timing(read_jsonl(os.path.join(reference_logs, name)))
        b = _strip_timing(read_jsonl(os.path.join(logs, name)))
        assert len(a) == len(b), name
        for ra, rb in zip(a, b):
            assert ra == rb, f"{name} differs at step {ra.get('step')}:\n{ra}\n{rb}"


def _assert_same_model(ckpt_a, ckpt_b, iteration):
    a, b = _model_state(ckpt_a, iteration), _model_state(ckpt_b, iteration)
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


def test_training_loss_decreases_and_logs(reference):
    train = read_jsonl(os.path.join(reference["logs"], "train.jsonl"))
    assert [r["step"] for r in train] == list(range(1, ITERS + 1))
    assert set(train[0]) >= {"step", "loss", "lr", "tokens_per_s", "step_time"}
    losses = [r["loss"] for r in train]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.1, f"loss did not decrease: {first:.4f} -> {last:.4f}"

    mixture = read_jsonl(os.path.join(reference["logs"], "mixture.jsonl"))
    assert [r["update"] for r in mixture] == list(range(ITERS // 3 + 1))  # update 0 = the prior
    assert [r["step"] for r in mixture[1:]] == list(range(3, ITERS + 1, 3))
    for r in mixture:
        assert list(r["weights"]) == list(DOMAINS)
        assert abs(sum(r["weights"].values()) - 1.0) < 1e-9
    assert all(sum(r["tokens"].values()) == 3 * 8 * 32 for r in mixture[1:])  # 3 steps x 8 samples x 32 tokens

    evals = read_jsonl(os.path.join(reference["logs"], "eval.jsonl"))
    assert [e["step"] for e in evals] == [8, 16, 24]
    for e in evals:
        assert list(e["domains"]) == list(DOMAINS)
        for r in e["domains"].values():
            assert r["ppl"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)
        assert e["average"]["loss"] == pytest.approx(sum(r["loss"] for r in e["domains"].values()) / 3)
    # the learnable domains improve more than noise
    assert evals[-1]["domains"]["counting"]["loss"] < evals[0]["domains"]["counting"]["loss"]
    assert "val ppl" in reference["proc"].stdout and "counting" in reference["proc"].stdout


def test_resume_is_bit_identical(corpus, reference, tmp_path):
    """Stop at step 10 (mid update window, dropout on), resume: same losses, weights, evals, model."""
    logs, ckpt = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    args = _train_args(corpus, logs, "--save", ckpt, "--save-interval", "5")
    _check(run_cli(args + ["--exit-interval", "10"]), "first half")
    assert read_jsonl(os.path.join(logs, "train.jsonl"))[-1]["step"] == 10
    resumed = run_cli(args + ["--load", ckpt])
    _check(resumed, "resumed run")
    assert "resumed from" in resumed.stderr
    _assert_same_run(reference["logs"], logs)
    _assert_same_model(reference["ckpt"], ckpt, ITERS)


KILLER = r"""
import os, signal, sys
import odm_megatron.training.checkpoint as ckpt
real = ckpt._torch_save_synced
def dying_save(obj, path):
    if "iter_0000010" in path and path.endswith("mixer.pt"):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, path)
ckpt._torch_save_synced = dying_save
from odm_megatron.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_checkpoint_write_is_survived(corpus, reference, tmp_path):
    from odm_megatron.training.checkpoint import find_latest_checkpoint

    logs, ckpt = str(tmp_path / "logs"), str(tmp_path / "ckpt")
    args = _train_args(corpus, logs, "--save", ckpt, "--save-interval", "5")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    leftovers = sorted(os.listdir(ckpt))
    assert any(name.startswith("iter_0000010.tmp-") for name in leftovers), leftovers
    assert "iter_0000010" not in leftovers
    assert find_latest_checkpoint(ckpt) == 5

    resumed = run_cli(args + ["--load", ckpt])
    _check(resumed, "run resumed after the kill")
    assert "iter_0000005" in resumed.stderr
    assert not any(".tmp-" in name for name in os.listdir(ckpt))  # the next save cleaned up
    _assert_same_run(reference["logs"], logs)
    _assert_same_model(reference["ckpt"], ckpt, ITERS)


def _global_order(log_dir, nproc, micro_batch_size):
    """Samples in global order: micro-batch round m holds rank 0's micro-batch m, then rank 1's, ..."""
    per_rank = [read_jsonl(os.path.join(log_dir, f"sample_order_rank{r}.jsonl")) for r in range(nproc)]
    order = []
    for rows in zip(*per_rank):
        assert len({(row["step"], row["micro"]) for row in rows}) == 1
        for row in rows:
            assert len(row["samples"]) == micro_batch_size
            order += [(row["step"], d, p) for d, p in row["samples"]]
    return order


def test_static_policy_one_and_two_processes_consume_same_global_order(corpus, tmp_path):
    common = ["train", "--manifest", corpus["train"], *TINY_MODEL, "--micro-batch-size", "2",
              "--global-batch-size", "8", "--train-iters", "12", "--policy", "static", "--prior", "natural",
              "--eval-interval", "0", "--log-sample-order"]
    one = run_cli(common + ["--log-dir", str(tmp_path / "one")])
    _check(one, "1 process")
    two = run_cli(common + ["--log-dir", str(tmp_path / "two")], nproc=2)
    _check(two, "2 processes")
    order1 = _global_order(str(tmp_path / "one"), 1, 2)
    order2 = _global_order(str(tmp_path / "two"), 2, 2)
    assert len(order1) == 12 * 8
    assert order1 == order2
    assert len(set(order1)) == len(order1)  # no sample twice within the first epoch
    assert {d for _, d, _ in order1} == {0, 1, 2}


def test_two_process_odm_ranks_hold_identical_weights(corpus, tmp_path):
    logs = str(tmp_path / "logs")
    proc = run_cli(["train", "--manifest", corpus["train"], "--valid-manifest", corpus["valid"], *TINY_MODEL,
                    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "16", "--lr", "3e-3",
                    "--policy", "odm-exp3", "--update-interval", "1", "--eval-interval", "16",
                    "--log-dir", logs, "--log-sample-order"], nproc=2)
    _check(proc, "2-process odm-exp3")
    rank0 = read_jsonl(os.path.join(logs, "mixture_rank0.jsonl"))
    rank1 = read_jsonl(os.path.join(logs, "mixture_rank1.jsonl"))
    assert len(rank0) == 16 and rank0 == rank1  # every update, bit for bit (JSON floats round-trip)
    assert rank0 == read_jsonl(os.path.join(logs, "mixture.jsonl"))[1:]
    final = list(rank0[-1]["weights"].values())
    assert max(abs(w - 1 / 3) for w in final) > 1e-4, "weights never moved"
    # the two ranks consumed disjoint halves of every global batch
    samples = [set(map(tuple, row["samples"])) for r in range(2)
               for row in read_jsonl(os.path.join(logs, f"sample_order_rank{r}.jsonl"))]
    assert sum(len(s) for s in samples) == len(set().union(*samples)) == 16 * 8


# --- clear errors -----------------------------------------------------------------------------------

def _cli_error(capsys, argv):
    from odm_megatron.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def test_bad_flags_give_one_line_errors(corpus, capsys, tmp_path):
    base = ["train", "--manifest", corpus["train"], *TINY_MODEL, "--train-iters", "4"]
    cases = [
        (base + ["--micro-batch-size", "3", "--global-batch-size", "8"], "not divisible by --micro-batch-size"),
        (["train", "--data-path", "0.5", "a", "b", "--vocab-size", "256", "--eod-id", "0", "--train-iters", "4"],
         "'WEIGHT PREFIX' pairs"),
        (["train", "--manifest", str(tmp_path / "nope"), "--train-iters", "4"], "manifest not found"),
        (["train", "--manifest", corpus["train"]], "--train-iters is required"),
        (base + ["--tensor-model-parallel-size", "2"], "needs GPUs"),
        (base + ["--save-interval", "2"], "--save-interval needs --save"),
        (base + ["--prior", str(tmp_path / "missing.json")], "--odm-prior"),  # an alias: the message names the flag
        (base + ["--hidden-size", "30"], "not divisible by --num-attention-heads"),
        (base + ["--bf16"], "--bf16 needs a GPU"),
    ]
    for argv, message in cases:
        rc, err = _cli_error(capsys, argv)
        assert rc == 2, (argv, err)
        assert message in err, (message, err)
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    rc, err = _cli_error(capsys, base + ["--policy", "greedy"])
    assert rc == 2 and "invalid choice" in err


def test_mismatched_manifests_and_priors_give_clear_errors(corpus, capsys, tmp_path):
    base = ["train", "--manifest", corpus["train"], *TINY_MODEL, "--train-iters", "4"]
    raw = json.load(open(corpus["valid"]))
    valid_dir = os.path.dirname(corpus["valid"])
    for d in raw["domains"]:
        d["prefix"] = os.path.join(valid_dir, d["prefix"])
    raw["tokenizer"]["vocab_size"] = 300
    retok = tmp_path / "retokenized.json"
    retok.write_text(json.dumps(raw))
    rc, err = _cli_error(capsys, base + ["--valid-manifest", str(retok)])
    assert rc == 2 and "tokenized differently" in err
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"counting": 1.0, "motif": 2.0}))
    rc, err = _cli_error(capsys, base + ["--prior", str(prior)])
    assert rc == 2 and "missing ['noise']" in err


def test_resume_with_a_different_domain_list_is_refused(reference, tmp_path):
    other = make_corpus(str(tmp_path / "two_domains"), seed=5, domains=("counting", "motif"))
    proc = run_cli(["train", "--manifest", other, *TINY_MODEL, "--global-batch-size", "8", "--train-iters",
                    str(ITERS), "--load", reference["ckpt"], "--eval-interval", "0"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("odm-megatron train: error: checkpoint") and "domains" in last, last
    assert "Traceback" not in proc.stderr


def test_megatron_style_data_path(corpus, tmp_path):
    """--data-path W1 P1 W2 P2: domain names from the prefixes, the weights are the (static) prior."""
    train_dir, valid_dir = os.path.dirname(corpus["train"]), os.path.dirname(corpus["valid"])
    logs = str(tmp_path / "logs")
    proc = run_cli(["train", "--data-path", "3", os.path.join(train_dir, "counting_text_document"),
                    "1", os.path.join(train_dir, "noise_text_document"), "--vocab-size", "256", "--eod-id", "0",
                    "--valid-data-path", os.path.join(valid_dir, "counting_text_document"),
                    os.path.join(valid_dir, "noise_text_document"),
                    *TINY_MODEL, "--global-batch-size", "8", "--train-iters", "4", "--policy", "static",
                    "--eval-interval", "4", "--log-dir", logs])
    _check(proc, "--data-path run")
    mixture = read_jsonl(os.path.join(logs, "mixture.jsonl"))
    assert mixture[-1]["weights"] == {"counting": 0.75, "noise": 0.25}
    assert set(read_jsonl(os.path.join(logs, "eval.jsonl"))[-1]["domains"]) == {"counting", "noise"}
