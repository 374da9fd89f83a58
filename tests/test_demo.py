"""``odm-megatron demo --quick``: corpus from this Python, tokenizer, preprocess, train, table, plot."""
from __future__ import annotations

import os

from training_fixtures import read_jsonl, run_cli

from odm_megatron.demo_corpus import DOMAINS, split_domain


def test_split_domain_holds_out_enough_and_is_deterministic():
    docs = [f"doc {i} " * (i % 7 + 1) * 50 for i in range(200)]
    train, valid = split_domain(docs, "x", max_chars=20_000, valid_fraction=0.05, min_valid_chars=4_000)
    assert sum(map(len, train)) + sum(map(len, valid)) <= 20_000 + max(map(len, docs))
    assert sum(map(len, valid)) >= 4_000 and not set(train) & set(valid)
    assert (train, valid) == split_domain(list(reversed(docs)), "x", 20_000, 0.05, 4_000)


def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    proc = run_cli(["demo", "--quick", "--output-dir", out], timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stdout = proc.stdout
    for domain in DOMAINS:
        assert domain in stdout
    assert "final weight" in stdout and "val ppl" in stdout and "average" in stdout
    assert os.path.getsize(os.path.join(out, "odm_demo.png")) > 10_000
    logs = os.path.join(out, "runs", "odm-exp3")
    train = read_jsonl(os.path.join(logs, "train.jsonl"))
    assert len(train) == 30 and train[-1]["loss"] < train[0]["loss"]
    evals = read_jsonl(os.path.join(logs, "eval.jsonl"))
    assert evals[-1]["step"] == 30 and set(evals[-1]["domains"]) == set(DOMAINS)
    # progress was visible: the steps of the demo and the training lines
    for marker in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "step     30/30"):
        assert marker in proc.stderr, marker
