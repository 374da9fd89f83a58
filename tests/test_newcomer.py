"""A newcomer's first hour (issue 12): validation data that does not name exactly the training
domains, the runnable library example, a quiet console, and the flags a new user reaches for."""
from __future__ import annotations

import math
import os

import pytest

from training_fixtures import TINY_MODEL, make_corpus, read_jsonl, run_cli

from odm_megatron.training.evaluate import eval_record


# --- validation domains: trained, trained without validation data, held out --------------------

def test_eval_record_splits_trained_and_held_out_domains():
    # a: 10 nats over 5 tokens (loss 2), b: 30 over 10 (loss 3), x (never trained): 4 over 2
    record = eval_record(7, {"a": 10.0, "x": 4.0, "b": 30.0}, {"a": 5, "x": 2, "b": 10}, ["b", "a", "c"])
    assert record["step"] == 7
    assert list(record["domains"]) == ["b", "a"]  # training order; "c" has no validation data
    assert record["domains"]["a"] == {"loss": 2.0, "ppl": pytest.approx(math.exp(2.0)), "tokens": 5}
    assert record["average"] == {"loss": 2.5, "ppl": pytest.approx((math.exp(2) + math.exp(3)) / 2)}
    assert record["token_weighted"]["loss"] == pytest.approx(40.0 / 15)
    assert record["token_weighted"]["ppl"] == pytest.approx(math.exp(40.0 / 15))
    assert list(record["held_out"]) == ["x"] and record["held_out"]["x"]["loss"] == 2.0
    assert record["held_out_average"] == {"loss": 2.0, "ppl": pytest.approx(math.exp(2.0))}


def test_eval_record_without_held_out_domains_and_with_an_empty_domain():
    record = eval_record(1, {"a": 6.0, "b": 0.0}, {"a": 3, "b": 0}, ["a", "b"])
    assert "held_out" not in record and "held_out_average" not in record
    assert math.isnan(record["domains"]["b"]["loss"]) and record["domains"]["b"]["tokens"] == 0
    assert record["average"]["loss"] == 2.0  # a domain with no tokens does not poison the average
    with pytest.raises(ValueError, match="different domains"):
        eval_record(1, {"a": 1.0}, {"b": 1}, ["a"])


def test_train_evaluates_whatever_validation_domains_are_given(tmp_path):
    """Validation lacks the trained domain 'noise' and has 'prose', never trained on: the run
    starts, says so once, scores counting/motif as the headline and prose as held-out."""
    train = make_corpus(str(tmp_path / "train"), seed=0)
    valid = make_corpus(str(tmp_path / "valid"), seed=1, docs_per_domain=12, domains=("motif", "prose", "counting"))
    logs = str(tmp_path / "logs")
    proc = run_cli(["train", "--manifest", train, "--valid-manifest", valid, *TINY_MODEL, "--global-batch-size", "8",
                    "--train-iters", "4", "--eval-interval", "2", "--log-dir", logs, "--no-tensorboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    startup = [line for line in proc.stderr.splitlines() if "no validation data" in line]
    assert len(startup) == 1, proc.stderr
    assert "2 of 3 trained domains" in startup[0] and "noise" in startup[0] and "prose" in startup[0]

    evals = read_jsonl(os.path.join(logs, "eval.jsonl"))
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert list(e["domains"]) == ["counting", "motif"]  # training order, noise absent
        assert list(e["held_out"]) == ["prose"]
        per = e["domains"]
        assert e["average"]["loss"] == pytest.approx((per["counting"]["loss"] + per["motif"]["loss"]) / 2)
        pooled = sum(r["loss"] * r["tokens"] for r in per.values()) / sum(r["tokens"] for r in per.values())
        assert e["token_weighted"]["loss"] == pytest.approx(pooled)
        assert e["held_out_average"]["loss"] == pytest.approx(e["held_out"]["prose"]["loss"])
        assert all(r["tokens"] > 0 for r in [*per.values(), *e["held_out"].values()])
    assert "held-out avg ppl" in proc.stderr  # the console eval line
    assert "held-out (not trained on)" in proc.stdout and "prose" in proc.stdout  # the final table

    from odm_megatron.training.plot import plot_runs

    assert os.path.getsize(plot_runs([logs], str(tmp_path / "plot.png"))) > 10_000
