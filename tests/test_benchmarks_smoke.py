"""The benchmark scripts run end to end (tiny sizes) and write the documented keys.

Timing values are never checked: they depend on the machine and its load.
"""
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def _run_benchmark(script, *args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_overhead_smoke(tmp_path):
    """The smoke run's derived numbers and verdicts follow from its own measurements, and the
    report prints them; flipping a measurement across a threshold flips the verdict."""
    import statistics

    from overhead_report import TARGETS, analyse, render

    out = tmp_path / "overhead"
    proc = _run_benchmark("overhead.py", "--smoke", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads((out / "overhead.json").read_text(encoding="utf-8"))
    md = (out / "overhead.md").read_text(encoding="utf-8")
    assert fig["mode"] == "smoke" and md.startswith("# What does online mixing cost?") and "**Smoke run**" in md
    assert fig["command"].startswith("python benchmarks/overhead.py --smoke")
    assert fig["model"]["builder"] == "odm_megatron.training.model.build_model"

    # derived numbers recomputed here from the raw measurements
    dp = fig["data_path"]["plain_loop_s"]
    ratio = statistics.median(b / o for o, b in zip(dp["online"]["cpu"], dp["blended"]["cpu"]))
    assert fig["checks"]["data_path_ratio"]["value"] == pytest.approx(ratio, rel=1e-12)
    step = {c: fig["model"]["fwd_bwd_s"][c]["median"] for c in ("cpu", "wall")}
    sums = {}
    for k, e in fig["feedback"].items():
        acc = max(e[c]["accumulate_s"]["median"] / step[c] for c in step)
        upd = max(e[c]["step_end_update_s"]["median"] / step[c] for c in step)
        assert fig["derived"]["feedback"][k]["accumulate_fraction"] == pytest.approx(acc, rel=1e-12)
        sums[k] = acc + upd
    assert fig["checks"]["feedback_fraction"]["value"] == pytest.approx(max(sums.values()), rel=1e-12)
    snaps = fig["online_index"]["snapshots"]
    assert fig["checks"]["mixer_growth_bytes"]["value"] == (max(s["mixer_bytes"] for s in snaps.values())
                                                            - min(s["mixer_bytes"] for s in snaps.values()))
    assert fig["online_index"]["epoch_order_dtype"] == "uint32"
    assert fig["derived"]["epoch_order_bound_bytes"] == 4 * sum(fig["online_index"]["samples_per_domain_one_epoch"])
    for name, (op, threshold, _) in TARGETS.items():
        c = fig["checks"][name]
        assert c["met"] == {">=": c["value"] >= threshold, "<": c["value"] < threshold, "<=": c["value"] <= threshold}[op]
    assert analyse(fig)["checks"] == fig["checks"]

    # the report prints the computed figures and verdicts, no fixed conclusions
    assert f"**{ratio:.3f}**" in md
    row = next(line for line in md.splitlines() if line.startswith("| data path, plain loop"))
    assert row.endswith("| **met** |" if fig["checks"]["data_path_ratio"]["met"] else "| **NOT met** |")
    for phrase in ("far below", "orders of magnitude", "int64 permutation"):
        assert phrase not in md
    assert "uint32 array" in md and "estimate, not measured" in md

    # move the online side's CPU times across the threshold: the verdict follows
    for factor, expected in ((0.5, True), (2.0, False)):
        dp["online"]["cpu"] = [b * factor for b in dp["blended"]["cpu"]]
        fig.update(analyse(fig))
        assert fig["checks"]["data_path_ratio"]["met"] is expected
        row = next(line for line in render(fig).splitlines() if line.startswith("| data path, plain loop"))
        assert row.endswith("| **met** |" if expected else "| **NOT met** |")


def _zst_lines(path):
    import zstandard

    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        return [json.loads(line) for line in io.TextIOWrapper(r, encoding="utf-8") if line.strip()]


def _last_eval(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return max(rows, key=lambda r: r["step"])


def test_learning_efficiency_smoke(tmp_path):
    """Held-out carve, tokenizer, three preprocessed splits, three runs each evaluated on both
    splits, figures and report, on a synthetic corpus; every figure checked against its source."""
    out = tmp_path / "le"
    proc = _run_benchmark("learning_efficiency.py", "--smoke", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((out / "learning_efficiency.json").read_text(encoding="utf-8"))
    work = out / "_smoke_work"
    from odm_megatron.policy import DEFAULT_POLICY

    assert figures["library_default_policy"] == DEFAULT_POLICY and figures["mode"] == "smoke"
    runs = {(r["policy"], r["setting"], r["horizon"], r["seed"]): r for r in figures["runs"]}
    assert set(runs) == {("uniform", "-", 6, 1), ("odm-exp3", "default", 6, 1), ("odm-exp3", "alt", 6, 1)}

    # the held-out slice: no shared document, every document on the side its hash says, counts as recorded
    carve = figures["heldout_split"]
    source = [json.loads(line) for line in (work / "smoke_train.jsonl").read_text().splitlines() if line.strip()]
    kept, held = _zst_lines(work / "train_kept.jsonl.zst"), _zst_lines(work / "heldout.jsonl.zst")
    key = lambda d: int.from_bytes(hashlib.sha256(d["text"].encode()).digest()[:8], "big")  # noqa: E731
    assert held and kept and not {d["text"] for d in held} & {d["text"] for d in kept}
    assert sorted(d["text"] for d in kept + held) == sorted(d["text"] for d in source)
    assert all(key(d) < carve["fraction"] * 2**64 for d in held)
    assert all(key(d) >= carve["fraction"] * 2**64 for d in kept)
    for domain, c in carve["per_domain"].items():
        assert c["heldout_docs"] == sum(d["meta"]["pile_set_name"] == domain for d in held) > 0
        assert c["train_docs"] == sum(d["meta"]["pile_set_name"] == domain for d in kept) > 0
    manifests = {s: json.loads((work / "data" / s / "manifest.json").read_text()) for s in ("train", "heldout")}
    assert ({d["name"] for d in manifests["train"]["domains"]} == {d["name"] for d in manifests["heldout"]["domains"]}
            == set(carve["per_domain"]))

    # one evaluation manifest: the validation split as it is, the held-out slice as heldout-<domain>
    eval_names = [d["name"] for d in json.loads((work / "data" / "eval" / "manifest.json").read_text())["domains"]]
    assert eval_names == sorted(carve["per_domain"]) + [f"heldout-{d}" for d in sorted(carve["per_domain"])]

    # per-run figures are the final row of that run's own eval log, at the horizon
    for (policy, setting, horizon, seed), r in runs.items():
        sub = "static" if setting == "-" else setting
        row = _last_eval(work / "runs" / policy / sub / f"h{horizon}" / f"seed{seed}" / "eval.jsonl")
        assert row["step"] == horizon
        assert r["valid"]["avg_ppl"] == row["average"]["ppl"]
        assert r["valid"]["domains_ppl"] == {d: v["ppl"] for d, v in row["domains"].items()}
        assert r["heldout"]["avg_ppl"] == row["held_out_average"]["ppl"]
        assert r["heldout"]["domains_ppl"] == {d[len("heldout-"):]: v["ppl"] for d, v in row["held_out"].items()}
        assert set(r["heldout"]["domains_ppl"]) == set(r["valid"]["domains_ppl"]) == set(carve["per_domain"])
        assert r["curves"]["heldout"][-1] == [horizon, r["heldout"]["avg_ppl"]]
    # the two splits are different data: the same model scores them differently
    assert runs[("uniform", "-", 6, 1)]["valid"]["avg_ppl"] != runs[("uniform", "-", 6, 1)]["heldout"]["avg_ppl"]

    # paired ratios recomputed here from the per-run figures
    cells = {(c["policy"], c["setting"], c["split"]): c for c in figures["comparisons"]}
    assert set(cells) == {("odm-exp3", s, split) for s in ("default", "alt") for split in ("valid", "heldout")}
    for (policy, setting, split), c in cells.items():
        expected = runs[(policy, setting, 6, 1)][split]["avg_ppl"] / runs[("uniform", "-", 6, 1)][split]["avg_ppl"]
        assert c["ratios"] == [expected] and c["mean"] == expected and c["n"] == 1
        assert c["at_or_below"] == int(expected <= 1.0) and c["std"] is None
    verdict = figures["decision"]["verdicts"]["odm-exp3"]
    assert verdict["verdict"] == "undecided" and "fewer than 5 seeds" in verdict["why_undecided"]
    assert not figures["decision"]["protocol_complete"]  # one horizon

    # the report says what the figures say
    md = (out / "learning_efficiency.md").read_text()
    assert md.startswith("# Learning efficiency") and "**Smoke run**" in md and "**Reduced protocol**" in md
    for (policy, setting, split), c in cells.items():
        assert f"| {policy} | {setting} | 6 | **{c['mean']:.3f}** |" in md
    assert "| odm-exp3 | **undecided** |" in md


def _synthetic_figures(ratios_by_cell, horizons=(400, 1200), settings=("default", "alt")):
    """Figures whose held-out ratios to uniform are known: uniform's perplexity 100 + seed,
    the policy's that times the ratio; the validation split the same."""
    runs = []
    seeds = sorted({s for ratios in ratios_by_cell.values() for s in range(1, len(ratios) + 1)})
    for h in horizons:
        for s in seeds:
            base = 100.0 + s
            runs.append({"policy": "uniform", "setting": "-", "horizon": h, "seed": s,
                         "valid": {"avg_ppl": base}, "heldout": {"avg_ppl": base}, "seconds": 1.0})
    for (policy, setting, h), ratios in ratios_by_cell.items():
        for s, r in enumerate(ratios, 1):
            ppl = (100.0 + s) * r
            runs.append({"policy": policy, "setting": setting, "horizon": h, "seed": s,
                         "valid": {"avg_ppl": ppl}, "heldout": {"avg_ppl": ppl}, "seconds": 1.0})
    return {"runs": runs, "config": {"horizons": list(horizons), "settings": list(settings), "seeds": seeds}}


def test_decision_rule_known_answers():
    from learning_efficiency_report import analyse, cell_passes

    good = [0.99, 0.98, 1.01, 0.99, 0.97]        # mean 0.988, 4 of 5 at or below
    at_one = [1.0, 1.0, 1.0, 1.0, 1.0]           # exactly uniform counts as "at or below"
    three_of_five = [0.95, 0.95, 1.01, 1.01, 0.99]  # mean 0.982 but only 3 of 5
    high_mean = [0.99, 0.99, 0.99, 0.99, 1.10]   # 4 of 5 but mean 1.012
    cells = {}
    for h in (400, 1200):
        for setting in ("default", "alt"):
            cells[("A", setting, h)] = good
            cells[("B", setting, h)] = at_one
            cells[("C", setting, h)] = three_of_five if (setting, h) == ("alt", 1200) else good
            cells[("D", setting, h)] = high_mean if (setting, h) == ("default", 400) else good
            cells[("E", setting, h)] = good[:4]
    derived = analyse(_synthetic_figures(cells))
    verdicts = {p: v["verdict"] for p, v in derived["decision"]["verdicts"].items()}
    assert verdicts == {"A": "eligible", "B": "eligible", "C": "not eligible", "D": "not eligible", "E": "undecided"}
    assert derived["decision"]["verdicts"]["C"]["failing_cells"] == ["alt/h1200"]
    assert derived["decision"]["verdicts"]["D"]["failing_cells"] == ["default/h400"]
    held = {(c["policy"], c["setting"], c["horizon"]): c for c in derived["comparisons"] if c["split"] == "heldout"}
    c = held[("D", "default", 400)]
    assert c["at_or_below"] == 4 and math.isclose(c["mean"], sum(high_mean) / 5)
    assert math.isclose(c["std"], (sum((r - c["mean"]) ** 2 for r in high_mean) / 4) ** 0.5)
    assert all(math.isclose(a, b) for a, b in zip(c["ratios"], high_mean))
    assert cell_passes(held[("A", "alt", 1200)]) is True and cell_passes(held[("E", "alt", 1200)]) is None

    # a passing policy is not eligible from one horizon or one setting: the protocol is incomplete
    one_horizon = analyse(_synthetic_figures({("A", s, 400): good for s in ("default", "alt")}, horizons=(400,)))
    assert one_horizon["decision"]["verdicts"]["A"]["verdict"] == "undecided"
    assert not one_horizon["decision"]["protocol_complete"]
    one_setting = analyse(_synthetic_figures({("A", "default", h): good for h in (400, 1200)}, settings=("default",)))
    assert one_setting["decision"]["verdicts"]["A"]["verdict"] == "undecided"

    # no uniform run for a policy's seed: an error, not a silent skip
    figures = _synthetic_figures({("A", "default", 400): good})
    figures["runs"] = [r for r in figures["runs"] if not (r["policy"] == "uniform" and r["seed"] == 3)]
    with pytest.raises(ValueError, match="no uniform run for horizon 400 seed 3"):
        analyse(figures)


def test_report_recomputes_and_prints_the_figures(tmp_path):
    """The report tool ignores stored comparisons (recomputes them) and prints each cell's numbers."""
    from learning_efficiency_report import main

    cells = {("A", s, h): [0.99, 0.98, 1.01, 0.99, 0.97] for s in ("default", "alt") for h in (400, 1200)}
    cells.update({("B", s, h): [1.02, 1.03, 0.99, 1.01, 1.0] for s in ("default", "alt") for h in (400, 1200)})
    figures = _synthetic_figures(cells)
    figures.update({
        "mode": "measured", "command": "python benchmarks/learning_efficiency.py (synthetic)", "date": "today",
        "machine": {"cpus": 2, "processor": "x", "python": "3"}, "load_average": {"start": [0], "end": [0]},
        "wall_time_s": 60.0, "library_default_policy": "A",
        "settings_flags": {"default": {}, "alt": {"A": ["--odm-alpha", "0.5"]}},
        "heldout_split": {"fraction": 0.05, "method": "m", "heldout_hashes_sha256": "0" * 64,
                          "per_domain": {"x": {"heldout_docs": 1, "train_docs": 9}}},
        "comparisons": [{"bogus": True}], "decision": {"bogus": True},
    })
    figures["config"].update({"parallel_runs": 2, "threads_per_run": 1, "num_layers": 1, "hidden_size": 8,
                              "num_attention_heads": 1, "seq_length": 8, "micro_batch_size": 2, "lr": 1e-3,
                              "vocab_size": 100, "update_interval": 1, "eval_iters": 1})
    path = tmp_path / "f.json"
    path.write_text(json.dumps(figures))
    assert main([str(path)]) == 0
    md = (tmp_path / "f.md").read_text()
    assert "Reduced protocol" not in md and "Smoke run" not in md
    assert "| A | **eligible** | 4/4 |" in md and "| B | **not eligible** | 0/4 |" in md
    assert "its verdict in this run: **eligible**" in md
    rows = re.findall(r"^\| B \| alt \| 1200 \| \*\*([0-9.]+)\*\* \| ([0-9.]+) \| ([0-9., ]+) \| (\d)/5 \|", md, re.M)
    assert len(rows) == 2  # held-out and validation tables
    mean, _, per, below = rows[0]
    assert float(mean) == round(sum([1.02, 1.03, 0.99, 1.01, 1.0]) / 5, 3) and int(below) == 2
    assert [float(x) for x in per.split(", ")] == [1.02, 1.03, 0.99, 1.01, 1.0]


def test_carve_heldout_keeps_identical_texts_together_and_refuses_an_empty_side(tmp_path):
    from learning_efficiency import carve_heldout, heldout_hash

    docs = [{"text": f"document {i}", "meta": {"pile_set_name": "A" if i % 2 else "B"}} for i in range(200)]
    docs.append(dict(docs[7]))  # a duplicate text
    src, tail = tmp_path / "in.jsonl", tmp_path / "tail.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs[:-1]) + "not json")  # no final line break
    tail.write_text(json.dumps(docs[-1]) + "\n")
    rec = carve_heldout([str(src), str(tail)], str(tmp_path / "t.jsonl.zst"), str(tmp_path / "h.jsonl.zst"), 0.3)
    import zstandard

    def lines(p):
        with open(p, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
            return io.TextIOWrapper(r, encoding="utf-8").read().splitlines()

    kept, held = lines(tmp_path / "t.jsonl.zst"), lines(tmp_path / "h.jsonl.zst")
    assert "not json" in kept and rec["unparsed_lines_left_in_training"] == 1
    assert len(kept) + len(held) == len(docs) + 1  # every line kept whole, on one side
    held_texts = [json.loads(x)["text"] for x in held]
    assert held_texts.count("document 7") in (0, 2)
    assert all(heldout_hash(t) < 0.3 * 2**64 for t in held_texts)
    assert 0.15 < len(held) / len(docs) < 0.45
    assert sum(c["heldout_docs"] for c in rec["per_domain"].values()) == len(held)
    with pytest.raises(SystemExit, match="no document on one side"):
        carve_heldout([str(src)], str(tmp_path / "t2.jsonl.zst"), str(tmp_path / "h2.jsonl.zst"), 1e-6)


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    from learning_efficiency import build_parser, run_dir, run_one, train_flags

    args = build_parser().parse_args([])
    log_dir = run_dir(str(tmp_path), "odm-exp3", "alt", 400, 1)
    os.makedirs(log_dir)
    open(os.path.join(log_dir, "DONE"), "w").write("12.0 20.0\n")
    flags = ["--policy", "odm-exp3", "--prior", "natural", "--seed", "1", *train_flags(args, 400),
             "--odm-alpha", "0.5"]
    with open(os.path.join(log_dir, "run_config.json"), "w") as f:
        json.dump({"name": "odm-exp3", "setting": "alt", "flags": flags}, f)
    assert run_one(args, {}, str(tmp_path), "odm-exp3", "alt", 400, 1) == log_dir  # same settings: reused
    other = build_parser().parse_args(["--lr", "0.002"])
    with pytest.raises(SystemExit, match="made with other settings"):
        run_one(other, {}, str(tmp_path), "odm-exp3", "alt", 400, 1)
