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
                    "--train-iters", "4", "--eval-interval", "2", "--log-dir", logs, "--no-tensorboard",
                    "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch CPU threads: 1 (--threads)" in proc.stderr
    assert "Megatron-FSDP" not in proc.stderr  # megatron-core's import-time INFO lines (odm_megatron._quiet)
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


def test_valid_data_path_names_its_domains_from_the_prefixes(tmp_path, caplog):
    import argparse
    import logging

    from odm_megatron.errors import ConfigError
    from odm_megatron.training.data import resolve_sources

    train_dir, valid_dir = str(tmp_path / "train"), str(tmp_path / "valid")
    make_corpus(train_dir)
    make_corpus(valid_dir, seed=1, docs_per_domain=12, domains=("prose", "counting"))
    prefix = lambda d, n: os.path.join(d, f"{n}_text_document")  # noqa: E731
    args = argparse.Namespace(manifest=None, vocab_size=256, eod_id=0, valid_manifest=None,
                              data_path=[x for n in ("counting", "motif", "noise") for x in ("1", prefix(train_dir, n))],
                              valid_data_path=[prefix(valid_dir, "prose"), prefix(valid_dir, "counting")])
    with caplog.at_level(logging.INFO, logger="odm_megatron.training.data"):
        sources = resolve_sources(args)
    assert sources.valid.domain_names == ["prose", "counting"]  # by name, not by position
    [line] = [r.getMessage() for r in caplog.records if "validation:" in r.getMessage()]
    assert "1 of 3 trained domains" in line and "motif, noise" in line and "prose" in line
    args.valid_data_path = [prefix(valid_dir, "prose"), prefix(train_dir, "prose")]
    with pytest.raises(ConfigError, match="same domain name"):
        resolve_sources(args)


# --- a quiet console ------------------------------------------------------------------------------

NOISE = ("Transformer Engine", "Apex", "Megatron-FSDP")


def test_importing_the_library_says_nothing_about_absent_optional_dependencies():
    """With Python's default warning filters and INFO logging (as a user's script has them),
    importing every layer and the trainer prints none of megatron-core's Transformer Engine /
    Apex / Megatron-FSDP lines."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "import odm_megatron.dataset, odm_megatron.mixer, odm_megatron.training.train; "
            "import megatron.core.optimizer; logging.getLogger('megatron.core').warning('still heard')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr
    assert "still heard" in proc.stderr  # megatron-core's other messages still reach the user


# --- flags a new user reaches for ---------------------------------------------------------------

def _help(command):
    import contextlib
    import io

    from odm_megatron.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([command, "--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines


def test_help_explains_the_flags_a_newcomer_asks_about():
    train = _help("train")
    assert "--threads N torch CPU threads" in train
    assert "--distributed-timeout-minutes DISTRIBUTED_TIMEOUT_MINUTES how long a collective" in train
    assert "(default: odm-exp3)" in train
    assert "--title TITLE a title above the figure" in _help("plot")
    tokenizer = _help("train-tokenizer")
    assert "(default: 100M)" in tokenizer and "100000000" not in tokenizer


def test_sample_bytes_default_is_the_size_its_help_shows():
    import argparse

    from odm_megatron.preprocess.tokenizer_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input", "x.jsonl", "--vocab-size", "512", "--output", "tok"])
    assert args.sample_bytes == 100_000_000
    assert parser.parse_args(["--input", "x", "--vocab-size", "512", "--output", "t", "--sample-bytes", "2G"]
                             ).sample_bytes == 2_000_000_000


# --- the README's library example runs ------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "library_usage.py")


def _readme_library_snippet() -> str:
    readme = open(os.path.join(os.path.dirname(EXAMPLE), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Library use"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


def test_readme_library_snippet_is_part_of_the_tested_example():
    import textwrap

    snippet = textwrap.dedent(_readme_library_snippet())
    example = textwrap.dedent(open(EXAMPLE, encoding="utf-8").read())
    body = "\n".join(line[4:] if line.startswith("    ") else line for line in example.splitlines())
    assert len(snippet.splitlines()) >= 15
    assert snippet in example or snippet in body, "README's snippet is not verbatim in examples/library_usage.py"


def test_library_example_runs(tmp_path):
    import importlib.util
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, EXAMPLE, "--steps", "12", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 policy updates over 12 steps" in proc.stdout
    for domain in ("Pile-CC", "Wikipedia (en)", "DM Mathematics", "Github", "Enron Emails"):
        assert domain in proc.stdout
    saved = __import__("torch").load(str(tmp_path / "checkpoint.pt"), weights_only=True)
    assert saved["step"] == 12 and saved["bandit"]

    spec = importlib.util.spec_from_file_location("library_usage", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    records = example.train(str(tmp_path / "shards" / "manifest.json"), steps=6, cache=str(tmp_path / "cache"))
    assert [r["update"] for r in records] == list(range(1, 7))
    assert all(abs(sum(r["weights"].values()) - 1) < 1e-9 for r in records)
    assert sum(sum(r["tokens"].values()) for r in records) == 6 * 8 * 64  # 6 steps x 8 samples x 64 tokens
