"""``odm-megatron plot`` on synthetic log dirs (no training needed)."""
from __future__ import annotations

import json
import os

import pytest

from odm_megatron.cli import main as cli_main
from odm_megatron.training.plot import load_run, plot_runs, run_label


def _write_run(directory, domains, steps=20, shift=0.0):
    os.makedirs(directory, exist_ok=True)
    k = len(domains)
    with open(os.path.join(directory, "mixture.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "update": 0, "effective_step": 1,
                            "weights": {d: 1 / k for d in domains}}) + "\n")
        for s in range(1, steps + 1):
            raw = [1.0 + shift * s * (i + 1) / steps for i in range(k)]
            w = {d: r / sum(raw) for d, r in zip(domains, raw)}
            f.write(json.dumps({"step": s, "update": s, "effective_step": s + 3, "weights": w,
                                "loss": {d: 5.0 for d in domains}, "tokens": {d: 10 for d in domains}}) + "\n")
        f.write('{"step": 21, "upd')  # a torn last line (killed run) is skipped
    with open(os.path.join(directory, "eval.jsonl"), "w") as f:
        for s in range(5, steps + 1, 5):
            res = {d: {"loss": 5 - s / 10 + i, "ppl": 2.718 ** (5 - s / 10 + i)} for i, d in enumerate(domains)}
            avg = {"loss": sum(r["loss"] for r in res.values()) / k, "ppl": sum(r["ppl"] for r in res.values()) / k}
            f.write(json.dumps({"step": s, "domains": res, "average": avg}) + "\n")
    with open(os.path.join(directory, "train.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 5.0}) + "\n")


def test_plot_one_and_several_runs(tmp_path):
    a, b = str(tmp_path / "odm" / "logs"), str(tmp_path / "static")
    _write_run(a, ["code", "web", "books"], shift=2.0)
    _write_run(b, ["code", "web", "books", "math"])
    run = load_run(a)
    assert run["domains"] == ["code", "web", "books"] and run["last_step"] == 20
    assert len(run["mixture"]) == 21  # torn line skipped
    assert run_label(a) == "odm"
    out = plot_runs([a], str(tmp_path / "one.png"))
    assert os.path.getsize(out) > 10_000
    assert cli_main(["plot", a, b, "-o", str(tmp_path / "two.png"), "--title", "odm vs static"]) == 0
    with open(tmp_path / "two.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", a]) == 0
    assert os.path.isfile(os.path.join(a, "odm_plot.png"))


def test_plot_rejects_a_dir_without_logs(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no mixture.jsonl or eval.jsonl" in err and len(err.strip().splitlines()) == 1
