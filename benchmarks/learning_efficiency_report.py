#!/usr/bin/env python
"""The report half of the learning-efficiency protocol: figures JSON -> paired ratios, decision, markdown.

Pure functions of the figures that ``learning_efficiency.py`` writes (its ``runs`` list), so a
report can be re-made, or checked, from the JSON alone::

    python benchmarks/learning_efficiency_report.py docs/benchmarks/learning_efficiency.json

The decision rule (issue 12): a policy may become the default only where, on the held-out slice,
its final average perplexity divided by uniform's (same seed, same horizon) is <= 1 in the mean
over seeds AND on at least 4 of 5 seeds (a fraction >= 0.8 of at least 5 seeds), at every
hyperparameter setting and horizon; a run with fewer seeds, horizons or settings than that
cannot make a policy the default.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional

BASELINE = "uniform"
RULE = {
    "split": "heldout",           # the decision is made on data no policy was chosen on
    "max_mean_ratio": 1.0,        # mean over seeds of policy / uniform at or below this
    "min_seeds": 5,               # fewer seeds: no decision
    "min_fraction_at_or_below": 0.8,  # 4 of 5 seeds at or below uniform
    "min_horizons": 2,
    "min_settings": 2,
}
SPLITS = {"heldout": "held-out slice of the training file", "valid": "validation split"}


def _key(run: dict) -> tuple:
    return run["policy"], run["setting"], run["horizon"]


def paired_ratios(runs: List[dict], split: str) -> List[dict]:
    """One cell per (policy, setting, horizon) other than the baseline: final average perplexity
    on ``split`` divided by the baseline's of the same seed and horizon, with their spread."""
    base = {(r["horizon"], r["seed"]): r[split]["avg_ppl"] for r in runs if r["policy"] == BASELINE}
    cells: Dict[tuple, Dict[int, float]] = {}
    for r in runs:
        if r["policy"] == BASELINE:
            continue
        ref = base.get((r["horizon"], r["seed"]))
        if ref is None:
            raise ValueError(f"no {BASELINE} run for horizon {r['horizon']} seed {r['seed']}")
        cells.setdefault(_key(r), {})[r["seed"]] = r[split]["avg_ppl"] / ref
    out = []
    for (policy, setting, horizon), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        seeds = sorted(by_seed)
        ratios = [by_seed[s] for s in seeds]
        out.append({
            "policy": policy, "setting": setting, "horizon": horizon, "split": split,
            "seeds": seeds, "ratios": ratios, "n": len(ratios),
            "mean": statistics.fmean(ratios),
            "std": statistics.stdev(ratios) if len(ratios) > 1 else None,
            "at_or_below": sum(r <= 1.0 for r in ratios),
        })
    return out


def cell_passes(cell: dict, rule: dict = RULE) -> Optional[bool]:
    """True/False by the rule; None where the cell has too few seeds to decide."""
    if cell["n"] < rule["min_seeds"]:
        return None
    need = math.ceil(rule["min_fraction_at_or_below"] * cell["n"] - 1e-9)
    return cell["mean"] <= rule["max_mean_ratio"] and cell["at_or_below"] >= need


def decide(cells: List[dict], config: dict, rule: dict = RULE) -> dict:
    """Per policy: ``eligible`` (passes at every setting and horizon), ``not eligible`` (some
    cell fails) or ``undecided`` (too few seeds, horizons or settings to tell)."""
    horizons, settings = len(config["horizons"]), len(config["settings"])
    short = []
    if horizons < rule["min_horizons"]:
        short.append(f"{horizons} horizon(s) < {rule['min_horizons']}")
    if settings < rule["min_settings"]:
        short.append(f"{settings} hyperparameter setting(s) < {rule['min_settings']}")
    verdicts = {}
    for policy in sorted({c["policy"] for c in cells if c["split"] == rule["split"]}):
        mine = [c for c in cells if c["policy"] == policy and c["split"] == rule["split"]]
        passes = [cell_passes(c, rule) for c in mine]
        failing = [f"{c['setting']}/h{c['horizon']}" for c, p in zip(mine, passes) if p is False]
        reasons = list(short)
        if any(p is None for p in passes):
            reasons.append(f"fewer than {rule['min_seeds']} seeds")
        if failing:
            verdict = "not eligible"
        elif reasons:
            verdict = "undecided"
        else:
            verdict = "eligible"
        verdicts[policy] = {"verdict": verdict, "failing_cells": failing, "why_undecided": reasons,
                            "cells_passing": sum(p is True for p in passes), "cells": len(mine)}
    return {"rule": dict(rule), "protocol_complete": not short, "verdicts": verdicts}


def analyse(figures: dict) -> dict:
    """The derived part of the figures JSON: paired ratios on both splits and the decision."""
    cells = [c for split in SPLITS for c in paired_ratios(figures["runs"], split)]
    return {"comparisons": cells, "decision": decide(cells, figures["config"])}


# -- markdown -----------------------------------------------------------------------------
def _ratio_row(c: dict) -> str:
    std = "-" if c["std"] is None else f"{c['std']:.3f}"
    per = ", ".join(f"{r:.3f}" for r in c["ratios"])
    passes = cell_passes(c)
    verdict = {True: "yes", False: "no", None: "too few seeds"}[passes]
    return (f"| {c['policy']} | {c['setting']} | {c['horizon']} | **{c['mean']:.3f}** | {std} | {per} | "
            f"{c['at_or_below']}/{c['n']} | {verdict} |")


def render(figures: dict) -> str:
    cfg, rule, decision = figures["config"], figures["decision"]["rule"], figures["decision"]
    runs = figures["runs"]
    seeds, horizons, settings = cfg["seeds"], cfg["horizons"], cfg["settings"]
    need = math.ceil(rule["min_fraction_at_or_below"] * rule["min_seeds"] - 1e-9)
    lines = ["# Learning efficiency: can a policy be the default?", ""]
    if figures["mode"] == "smoke":
        lines += ["**Smoke run** (synthetic corpus, tiny model): checks that the protocol executes; its "
                  "numbers mean nothing.", ""]
    if not decision["protocol_complete"] or len(seeds) < rule["min_seeds"]:
        lines += [f"**Reduced protocol**: {len(seeds)} seed(s), horizon(s) {horizons}, setting(s) {settings}. "
                  f"The rule needs at least {rule['min_seeds']} seeds, {rule['min_horizons']} horizons and "
                  f"{rule['min_settings']} settings, so this run cannot make any policy the default.", ""]
    load = figures.get("load_average", {})
    lines += [
        f"Command: `{figures['command']}`",
        "",
        f"Measured {figures['date']} on {figures['machine']['cpus']} x {figures['machine']['processor']} "
        f"(Python {figures['machine']['python']}); load average {load.get('start')} at the start, "
        f"{load.get('end')} at the end; wall time {figures['wall_time_s'] / 60:.1f} min"
        + (f" ({figures['runs_reused']} of {len(runs)} runs reused from the work dir)" if figures.get("runs_reused") else "")
        + f"; the runs took {sum(r['seconds'] for r in runs) / 60:.1f} run-minutes "
          f"({cfg['parallel_runs']} at a time, {cfg['threads_per_run']} thread(s) each).",
        "",
        f"Model: megatron-core GPTModel, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, sequence {cfg['seq_length']}, batch {cfg['micro_batch_size']}, "
        f"lr {cfg['lr']} (cosine to 10% at the horizon), BPE {cfg['vocab_size']}; policy update every "
        f"{cfg['update_interval']} step(s); evaluation on {cfg['eval_iters']} x {cfg['micro_batch_size']} fixed "
        f"windows per domain. Seeds {seeds}; horizons {horizons} steps; online policies start from the natural "
        "prior. Hyperparameter settings (extra `train` flags; none = the policy's defaults): "
        + "; ".join(f"`{s}`: " + (", ".join(f"{p} `{' '.join(f)}`" for p, f in figures["settings_flags"][s].items())
                                  or "defaults") for s in settings) + ".",
        "",
    ]
    carve = figures["heldout_split"]
    per = carve["per_domain"]
    lines += [
        f"Held-out slice: {sum(c['heldout_docs'] for c in per.values())} of "
        f"{sum(c['heldout_docs'] + c['train_docs'] for c in per.values())} training documents "
        f"(fraction {carve['fraction']}; {carve['method']}); those documents were removed from training and from "
        f"the tokenizer's sample. Held-out documents per domain: "
        + ", ".join(f"{d} {c['heldout_docs']}" for d, c in per.items())
        + f". Digest of the held-out hashes: `{carve['heldout_hashes_sha256'][:16]}`.",
        "",
        "## Decision",
        "",
        f"Rule: a policy may become the default only if, on the {SPLITS[rule['split']]}, its final average "
        f"perplexity / {BASELINE}'s (same seed and horizon) is <= {rule['max_mean_ratio']} in the mean over seeds "
        f"and on at least {need} of {rule['min_seeds']} seeds (fraction >= {rule['min_fraction_at_or_below']}), "
        f"at every setting and horizon, with at least {rule['min_seeds']} seeds, {rule['min_horizons']} horizons "
        f"and {rule['min_settings']} settings.",
        "",
        "| policy | verdict | cells passing | failing cells (setting/horizon) | why undecided |",
        "| --- | --- | --- | --- | --- |",
    ]
    for policy, v in decision["verdicts"].items():
        lines.append(f"| {policy} | **{v['verdict']}** | {v['cells_passing']}/{v['cells']} | "
                     f"{', '.join(v['failing_cells']) or '-'} | {'; '.join(v['why_undecided']) or '-'} |")
    default = figures["library_default_policy"]
    verdict = decision["verdicts"].get(default, {}).get("verdict")
    lines += ["", f"The library's default policy when this ran: `{default}`; "
              + (f"its verdict in this run: **{verdict}**." if verdict else "it was not measured in this run."), ""]
    for split, what in SPLITS.items():
        cells = [c for c in figures["comparisons"] if c["split"] == split]
        lines += [f"## Final average perplexity / {BASELINE}'s, {what}", "",
                  "Same seed and horizon; below 1: better than uniform.", "",
                  f"| policy | setting | horizon | mean | std | per seed {seeds} | seeds <= 1 | passes the rule |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [_ratio_row(c) for c in cells] + [""]
    lines += ["## Final average perplexity (mean over seeds)", "",
              "| policy | setting | horizon | held-out | validation |", "| --- | --- | --- | --- | --- |"]
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault(_key(r), []).append(r)
    for (policy, setting, horizon), rs in sorted(groups.items()):
        lines.append(f"| {policy} | {setting} | {horizon} | {statistics.fmean(r['heldout']['avg_ppl'] for r in rs):.2f} "
                     f"| {statistics.fmean(r['valid']['avg_ppl'] for r in rs):.2f} |")
    lines += ["", "Average = unweighted mean of the per-domain perplexities. Per-run figures (per-domain "
              "perplexities, curves of both splits, run times) are in the JSON.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("figures", help="JSON written by learning_efficiency.py")
    p.add_argument("--output", default=None, help="markdown path (default: the JSON's path with .md)")
    args = p.parse_args(argv)
    with open(args.figures) as f:
        figures = json.load(f)
    figures.update(analyse(figures))  # recomputed from the runs, never trusted from the file
    out = args.output or os.path.splitext(args.figures)[0] + ".md"
    with open(out, "w") as f:
        f.write(render(figures))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
