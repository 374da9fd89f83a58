"""``odm-megatron plot`` on synthetic log dirs (no training needed)."""
from __future__ import annotations

import json
import os


from odm_megatron.cli import main as cli_main
from odm_megatron.training.plot import build_figure, load_run, plot_runs, run_label, run_labels


def _write_run(directory, domains, steps=20, shift=0.0, held_out=()):
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
            record = {"step": s, "domains": res, "average": avg}  # the pre-held-out format (older runs)
            if held_out:
                record["held_out"] = {d: {"loss": 6 - s / 20, "ppl": 2.718 ** (6 - s / 20)} for d in held_out}
                record["held_out_average"] = {"loss": 6 - s / 20, "ppl": 2.718 ** (6 - s / 20)}
            f.write(json.dumps(record) + "\n")
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


def test_runs_sharing_a_name_get_distinct_column_titles(tmp_path):
    a, b, c = (str(tmp_path / "seed1" / "odm"), str(tmp_path / "seed2" / "odm"), str(tmp_path / "static"))
    assert run_labels([a, b, c]) == ["seed1/odm", "seed2/odm", "static"]
    x, y = str(tmp_path / "p" / "q" / "logs"), str(tmp_path / "r" / "q" / "logs")
    assert run_labels([x, y]) == ["p/q/logs", "r/q/logs"]
    for d in (a, b, c):
        _write_run(d, ["code", "web"])
    fig = build_figure([a, b, c])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["seed1/odm", "seed2/odm", "static"]


def test_legend_names_the_average_and_held_out_lines(tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    _write_run(old, ["code", "web"])  # an eval.jsonl from before held-out domains: still plots
    fig = build_figure([old])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["code", "web", "average (trained domains, unweighted)"]
    _write_run(new, ["code", "web"], held_out=["prose"])
    assert load_run(new)["held_out"] == ["prose"]
    fig = build_figure([old, new])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["code", "web", "prose", "average (trained domains, unweighted)",
                      "held-out domain (dotted)", "held-out average"]
    old_styles = [line.get_linestyle() for line in fig.axes[2].get_lines()]  # axes: weights row, then ppl row
    new_styles = [line.get_linestyle() for line in fig.axes[3].get_lines()]
    assert old_styles == ["-", "-", "--"] and new_styles == ["-", "-", "--", ":", ":"]
