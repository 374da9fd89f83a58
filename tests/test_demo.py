"""``odm-megatron demo --quick``: corpus from this Python, tokenizer, preprocess, an online run and
a static baseline side by side, the comparison printed from their logs, one figure."""
from __future__ import annotations

import json
import math
import os
import re

import pytest

from training_fixtures import read_jsonl, run_cli

from odm_megatron.demo import compare_runs, format_comparison
from odm_megatron.demo_corpus import DOMAINS, split_domain


def test_split_domain_holds_out_enough_and_is_deterministic():
    docs = [f"doc {i} " * (i % 7 + 1) * 50 for i in range(200)]
    train, valid = split_domain(docs, "x", max_chars=20_000, valid_fraction=0.05, min_valid_chars=4_000)
    assert sum(map(len, train)) + sum(map(len, valid)) <= 20_000 + max(map(len, docs))
    assert sum(map(len, valid)) >= 4_000 and not set(train) & set(valid)
    assert (train, valid) == split_domain(list(reversed(docs)), "x", 20_000, 0.05, 4_000)


def _run(label, weights_per_update, avg_ppl_per_eval, domain_ppl):
    mixture = [{"step": i, "update": i, "effective_step": i + 1, "weights": w} for i, w in enumerate(weights_per_update)]
    evals = [{"step": 10 * (i + 1), "domains": {d: {"ppl": p * a / avg_ppl_per_eval[-1]} for d, p in domain_ppl.items()},
              "average": {"ppl": a}} for i, a in enumerate(avg_ppl_per_eval)]
    return {"label": label, "mixture": mixture, "eval": evals}


def test_comparison_figures_come_from_the_runs():
    uniform = {"a": 0.5, "b": 0.5}
    online = _run("odm", [{"a": 0.8, "b": 0.2}, {"a": 0.6, "b": 0.4}, {"a": 0.45, "b": 0.55}], [200.0, 150.0, 99.0],
                  {"a": 90.0, "b": 108.0})
    static = _run("static", [uniform, uniform], [210.0, 140.0, 100.0], {"a": 100.0, "b": 100.0})
    c = compare_runs(online, static, {"a": 0.8, "b": 0.2})
    assert c["average"] == {"ppl": 99.0, "baseline_ppl": 100.0, "ratio": pytest.approx(0.99)}
    assert c["reached_baseline_final_at"] == 30  # 150 > 100 at step 20, 99 <= 100 at step 30
    a, b = c["domains"]
    assert (a["min_weight"], a["max_weight"], a["final_weight"]) == (0.45, 0.6, 0.45)  # update 0 (the prior) excluded
    assert a["ratio"] == pytest.approx(0.9) and b["ratio"] == pytest.approx(1.08)
    text = format_comparison(c, "odm", "static uniform")
    assert "1.0% below the static uniform run's 100.00" in text
    assert "reached the static uniform run's final average perplexity at step 30 of 30" in text
    assert "at most 10.0% (absolute) from the static uniform weights" in text  # a: 0.6 vs 0.5
    slower = _run("odm", [uniform, uniform], [220.0, 180.0, 101.0], {"a": 101.0, "b": 101.0})
    text = format_comparison(compare_runs(slower, static, {}), "odm", "static uniform")
    assert "1.0% above" in text and "did not reach" in text


def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    proc = run_cli(["demo", "--quick", "--output-dir", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stdout = proc.stdout
    for domain in DOMAINS:
        assert domain in stdout
    assert "Why uniform" in stdout and "odm-exp3 ppl" in stdout and "static uniform ppl" in stdout
    assert os.path.getsize(os.path.join(out, "odm_demo.png")) > 10_000

    online, static = os.path.join(out, "runs", "odm-exp3"), os.path.join(out, "runs", "static-uniform")
    for logs in (online, static):
        train = read_jsonl(os.path.join(logs, "train.jsonl"))
        assert len(train) == 30 and train[-1]["loss"] < train[0]["loss"]
        assert read_jsonl(os.path.join(logs, "eval.jsonl"))[-1]["step"] == 30
    # the same data and budget: the baseline samples uniformly throughout; the online run starts
    # from the natural mixture (the manifest's token shares) and its policy moves the weights
    manifest = json.load(open(os.path.join(out, "data", "train", "manifest.json")))
    total = sum(d["tokens"] for d in manifest["domains"])
    assert all(w == pytest.approx(0.25) for r in read_jsonl(os.path.join(static, "mixture.jsonl"))
               for w in r["weights"].values())
    online_mixture = read_jsonl(os.path.join(online, "mixture.jsonl"))
    assert online_mixture[0]["weights"] == {d["name"]: pytest.approx(d["tokens"] / total) for d in manifest["domains"]}
    assert len(online_mixture) == 31

    # the printed comparison is the runs' own final evaluation
    finals = [read_jsonl(os.path.join(d, "eval.jsonl"))[-1] for d in (online, static)]
    line = next(line for line in stdout.splitlines() if line.startswith("average"))
    printed = [float(v) for v in line.split()[1:]]
    assert printed[0] == pytest.approx(finals[0]["average"]["ppl"], abs=0.006)
    assert printed[1] == pytest.approx(finals[1]["average"]["ppl"], abs=0.006)
    assert printed[2] == pytest.approx(finals[0]["average"]["ppl"] / finals[1]["average"]["ppl"], abs=0.0006)
    ratio = re.search(r"odm-exp3's average validation perplexity is ([\d.]+), ([\d.]+)% (below|above|equal)", stdout)
    assert ratio and float(ratio.group(1)) == pytest.approx(finals[0]["average"]["ppl"], abs=0.006)
    assert math.isfinite(float(ratio.group(2)))
    for marker in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "step     30/30"):
        assert marker in proc.stderr, marker
    assert "step     30/30" in open(os.path.join(static, "console.log")).read()
