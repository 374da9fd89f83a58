#!/usr/bin/env python
"""The report half of the overhead benchmark: figures JSON -> derived fractions, target checks, markdown.

Pure functions of what ``overhead.py`` measured, so the report can be re-made from the JSON::

    python benchmarks/overhead_report.py docs/benchmarks/overhead.json

Every verdict is a comparison made here against a threshold stated in :data:`TARGETS`; the one
number that is not measured (a 1B model's step time) is an estimate whose formula is printed.
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

# A 1B-class GPT for the estimate (GPT-3 XL shape, ~1.3B parameters).
ONE_B = {"layers": 24, "hidden": 2048, "seq": 2048, "vocab": 50304, "micro_batch": 8}
TARGETS = {  # name -> (operator, threshold, what)
    "data_path_ratio": (">=", 0.95, "online samples per CPU-second / BlendedDataset's, plain loop"),
    "feedback_fraction": ("<", 0.005, "accumulate + one update, as a fraction of one micro-batch fwd+bwd, largest K"),
    "mixer_growth_bytes": ("<=", 2048, "growth of the mixer's bytes between the two horizons"),
    "online_minus_blended_bytes": ("<", 0, "online bytes (mixer + dataset cache) - BlendedDataset index bytes, "
                                           "longest horizon"),
    "cache_minus_bound_bytes": ("<=", 0, "dataset epoch-order cache - one epoch of every domain's order, longest horizon"),
}
OPS = {">=": operator.ge, "<": operator.lt, "<=": operator.le}


def gpt_flops_per_token(layers: int, hidden: int, seq: int, vocab: int) -> float:
    """Forward+backward FLOPs per token (Narayanan et al. 2021, no recomputation): 72Lh^2 + 12Lsh + 6Vh."""
    return 72.0 * layers * hidden**2 + 12.0 * layers * seq * hidden + 6.0 * vocab * hidden


def _pass_ratios(sides: Dict[str, Dict[str, List[float]]], clock: str) -> List[float]:
    """Per pass: BlendedDataset's time / the online path's = online throughput / BlendedDataset's."""
    return [b / o for o, b in zip(sides["online"][clock], sides["blended"][clock])]


def analyse(fig: Dict[str, Any]) -> Dict[str, Any]:
    """Everything derived from the measurements, and the target checks."""
    dp, model, fb, gloo = fig["data_path"], fig["model"], fig["feedback"], fig.get("gloo")
    n = dp["samples"]
    data = {}
    for name in ("plain_loop_s", "dataloader_s", "index_only_s"):
        data[name[:-2]] = {clock: {"ratio": statistics.median(_pass_ratios(dp[name], clock)),
                                   "pass_ratios": _pass_ratios(dp[name], clock),
                                   "online_samples_per_s": n / statistics.median(dp[name]["online"][clock]),
                                   "blended_samples_per_s": n / statistics.median(dp[name]["blended"][clock])}
                           for clock in ("cpu", "wall")}
    per_sample_us = {side: 1e6 * statistics.median(dp["index_only_s"][side]["cpu"]) / n for side in ("online", "blended")}
    per_sample_us["item_plus_blended_index"] = 1e6 * statistics.median(dp["plain_loop_s"]["blended"]["cpu"]) / n
    step = {c: model["fwd_bwd_s"][c]["median"] for c in ("cpu", "wall")}
    feedback = {}
    for k, e in fb.items():
        update = {f"1 process, {c}": e[c]["step_end_update_s"]["median"] / step[c] for c in ("cpu", "wall")}
        if gloo:
            slower = max(r[k]["step_end_update_s"]["median"] for r in gloo["per_rank"])
            update["2 gloo processes, wall"] = slower / step["wall"]
        acc = {c: e[c]["accumulate_s"]["median"] / step[c] for c in ("cpu", "wall")}
        feedback[k] = {"accumulate_fraction_by_clock": acc, "accumulate_fraction": max(acc.values()),
                       "update_fraction_by_measurement": update, "update_fraction": max(update.values()),
                       "update_fraction_amortized": max(update.values()) / fig["update_interval"]}
    # 1B estimate: the model's step time is NOT measured, it is flops / (the FLOP rate measured here)
    fpt = gpt_flops_per_token(ONE_B["layers"], ONE_B["hidden"], ONE_B["seq"], ONE_B["vocab"])
    small_fpt = gpt_flops_per_token(model["layers"], model["hidden"], model["seq_length"], model["padded_vocab"])
    rate = {c: small_fpt * model["micro_batch_size"] * model["seq_length"] / step[c] for c in step}
    tokens_1b = ONE_B["micro_batch"] * ONE_B["seq"]
    step_1b = {c: fpt * tokens_1b / rate[c] for c in rate}
    one_b = {"model": ONE_B, "flops_per_token": fpt, "measured_flops_per_s": rate, "estimated_step_s": step_1b,
             "accumulate_fraction_by_K": {k: max(e[c]["accumulate_1b_shape_s"]["median"] / step_1b[c] for c in step)
                                          for k, e in fb.items()}}
    oi, bi = fig["online_index"], fig["blended_index"]
    horizons = sorted(oi["snapshots"], key=int)
    longest = horizons[-1]
    snap = oi["snapshots"][longest]
    itemsize = {"uint32": 4, "uint64": 8}[oi["epoch_order_dtype"]]
    bound = itemsize * sum(oi["samples_per_domain_one_epoch"])
    mixer_bytes = [oi["snapshots"][h]["mixer_bytes"] for h in horizons]
    worst_k = max(feedback, key=lambda k: feedback[k]["accumulate_fraction"] + feedback[k]["update_fraction"])
    values = {
        "data_path_ratio": data["plain_loop"]["cpu"]["ratio"],
        "feedback_fraction": feedback[worst_k]["accumulate_fraction"] + feedback[worst_k]["update_fraction"],
        "mixer_growth_bytes": max(mixer_bytes) - min(mixer_bytes),
        "online_minus_blended_bytes": snap["mixer_bytes"] + snap["dataset_cache_bytes"] - bi[longest]["bytes"],
        "cache_minus_bound_bytes": snap["dataset_cache_bytes"] - bound,
    }
    checks = {name: {"value": values[name], "op": op, "threshold": thr, "what": what,
                     "met": bool(OPS[op](values[name], thr))} for name, (op, thr, what) in TARGETS.items()}
    return {"derived": {"data_path": data, "per_sample_us": per_sample_us, "step_s": step, "feedback": feedback,
                        "feedback_worst_K": worst_k, "one_b_estimate": one_b, "epoch_order_bound_bytes": bound},
            "checks": checks}


# -- markdown -----------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x >= 1e-4 else f"{100 * x:.1e}%"


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 0.01 else (f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.0f} s")


def render(fig: Dict[str, Any]) -> str:
    d, checks, m = fig["derived"], fig["checks"], fig["machine"]
    dp, model, oi, bi = fig["data_path"], fig["model"], fig["online_index"], fig["blended_index"]
    verdict = lambda name: "**met**" if checks[name]["met"] else "**NOT met**"  # noqa: E731
    target = lambda name: f"{checks[name]['op']} {checks[name]['threshold']}"  # noqa: E731
    horizons = sorted(oi["snapshots"], key=int)
    pl = d["data_path"]["plain_loop"]
    lines = ["# What does online mixing cost?", ""]
    if fig["mode"] == "smoke":
        lines += ["**Smoke run** (tiny sizes): checks that the benchmark executes; its numbers mean nothing.", ""]
    lines += [
        f"Measured {fig['date']} ({fig['mode']} mode, {fig['wall_s']:.0f} s) on {m['nproc']} x {m['cpu_model']}, "
        f"torch {m['torch']}, megatron-core {m['megatron_core']}; load average {fig['load_average']['start']} at the "
        f"start, {fig['load_average']['end']} at the end. Times are medians; each ratio is against a baseline "
        "measured in the same run. Clocks: **cpu** = CPU time of the measuring thread with torch on one thread; "
        "**wall** = wall clock with the default threads. Raw and derived numbers: `overhead.json`.",
        "",
        f"Command: `{fig['command']}`",
        "",
        "| what | measured | target | verdict |",
        "| --- | --- | --- | --- |",
        f"| data path, plain loop: online samples per CPU-second / BlendedDataset's | **{pl['cpu']['ratio']:.3f}** "
        f"({pl['cpu']['online_samples_per_s']:.0f} vs {pl['cpu']['blended_samples_per_s']:.0f}; wall clock "
        f"{pl['wall']['ratio']:.3f}) | {target('data_path_ratio')} | {verdict('data_path_ratio')} |",
        f"| data path through a DataLoader (num_workers=0) | {d['data_path']['dataloader']['cpu']['ratio']:.3f} cpu, "
        f"{d['data_path']['dataloader']['wall']['ratio']:.3f} wall | - | - |",
    ]
    for k, f in d["feedback"].items():
        lines.append(f"| K={k}: `accumulate` per micro-batch / one micro-batch fwd+bwd | "
                     f"{fmt_pct(f['accumulate_fraction'])} (largest of the clocks) | - | - |")
        upd = "; ".join(f"{fmt_pct(v)} ({n})" for n, v in f["update_fraction_by_measurement"].items())
        lines.append(f"| K={k}: `step_end` on an update step / one micro-batch fwd+bwd | {upd}; every "
                     f"{fig['update_interval']} steps: {fmt_pct(f['update_fraction_amortized'])} per step | - | - |")
    lines += [
        f"| accumulate + update, K={d['feedback_worst_K']} (the larger sum) | "
        f"**{fmt_pct(checks['feedback_fraction']['value'])}** | < {fmt_pct(checks['feedback_fraction']['threshold'])} "
        f"| {verdict('feedback_fraction')} |",
        f"| mixer bytes after {', '.join(f'{int(h):,}' for h in horizons)} steps | "
        + ", ".join(fmt_bytes(oi["snapshots"][h]["mixer_bytes"]) for h in horizons)
        + f" (growth {checks['mixer_growth_bytes']['value']} B) | growth {target('mixer_growth_bytes')} B | "
        f"{verdict('mixer_growth_bytes')} |",
        f"| dataset epoch-order cache after {', '.join(f'{int(h):,}' for h in horizons)} steps | "
        + ", ".join(fmt_bytes(oi["snapshots"][h]["dataset_cache_bytes"]) for h in horizons)
        + f" | <= one epoch of every domain's order ({oi['epoch_order_dtype']}: "
          f"{fmt_bytes(d['epoch_order_bound_bytes'])}) | {verdict('cache_minus_bound_bytes')} |",
        f"| online bytes vs BlendedDataset's index, {int(horizons[-1]):,} steps | "
        f"{fmt_bytes(oi['snapshots'][horizons[-1]]['mixer_bytes'] + oi['snapshots'][horizons[-1]]['dataset_cache_bytes'])}"
        f" vs {fmt_bytes(bi[horizons[-1]]['bytes'])} | online < BlendedDataset | {verdict('online_minus_blended_bytes')} |",
        f"| index build time, {int(horizons[-1]):,} steps | online {fmt_s(oi['construct_s'][horizons[-1]]['median'])}, "
        f"BlendedDataset {fmt_s(bi[horizons[-1]]['build_s']['median'])} | - | - |",
        "",
        "## Set-up",
        "",
        f"* Data path: {dp['num_domains']} synthetic domains made into one-epoch megatron-core GPTDatasets "
        f"({min(dp['samples_per_domain'])}..{max(dp['samples_per_domain'])} samples of {dp['seq_length']} tokens), "
        f"read by both sides: {dp['samples']} samples = {dp['steps']} steps x global batch {dp['global_batch_size']}, "
        f"micro-batch {dp['micro_batch_size']}, policy {dp['policy']} updating every {dp['update_interval']} steps; "
        f"passes interleaved step by step. Index alone (items that cost nothing): "
        f"{d['per_sample_us']['online']:.2f} us per sample online, {d['per_sample_us']['blended']:.2f} us "
        f"BlendedDataset; item plus BlendedDataset's index: {d['per_sample_us']['item_plus_blended_index']:.1f} us "
        "(CPU time).",
        f"* Step time: the trainer's model ({model['builder']}): {model['layers']} layers, hidden {model['hidden']}, "
        f"{model['heads']} heads, seq {model['seq_length']}, micro-batch {model['micro_batch_size']}, vocab "
        f"{model['vocab_size']} (padded {model['padded_vocab']}), {model['params'] / 1e6:.1f}M parameters; one "
        f"micro-batch forward+backward: {fmt_s(d['step_s']['cpu'])} cpu, {fmt_s(d['step_s']['wall'])} wall. "
        "Fractions are of ONE micro-batch; a step with more micro-batches makes them smaller.",
        "* Feedback: `mixer.accumulate` on the model's per-token loss; `mixer.step_end` on update steps, one "
        "process (its all-reduce is a no-op)"
        + (", and in a 2-process gloo group (the slower rank's median; all-reduced statistics "
           + ", ".join(f"{fig['gloo']['per_rank'][0][k]['stats_shape']} {fig['gloo']['per_rank'][0][k]['stats_dtype']} "
                       f"(K={k}): bare all_reduce "
                       f"{fmt_s(max(r[k]['all_reduce_stats_s']['median'] for r in fig['gloo']['per_rank']))}"
                       for k in d["feedback"]) + ")" if fig.get("gloo") else "; no 2-process measurement in this run")
        + ".",
        f"* Index: BlendedDataset's index built as `BlendedDataset._build_indices` builds it "
        f"({' + '.join(bi[horizons[-1]]['dtypes'])} per sample, megatron-core's `build_blending_indices`), for "
        f"steps x {oi['global_batch_size']} samples. Online: the mixer and `OnlineBlendedDataset` driven through "
        f"{oi['simulated_steps']:,} steps over {oi['num_domains']} domains sized as The Pile at sequence "
        f"{oi['assumed_seq_length']} (assuming {oi['assumed_tokens'] / 1e9:.0f}B tokens), odm-exp3 fed fixed "
        "synthetic losses; bytes counted by walking the objects. The dataset keeps, per domain past its first "
        f"epoch, that epoch's order as a {oi['epoch_order_dtype']} array.",
        "",
        "## A 1B model (estimate, not measured)",
        "",
    ]
    ob = d["one_b_estimate"]
    lines += [
        f"Step time of a GPT-3-XL-shaped model ({ONE_B['layers']} layers, hidden {ONE_B['hidden']}, seq "
        f"{ONE_B['seq']}, vocab {ONE_B['vocab']}, micro-batch {ONE_B['micro_batch']}) estimated as "
        "`flops_per_token x tokens / F`, with flops_per_token = 72Lh^2 + 12Lsh + 6Vh = "
        f"{ob['flops_per_token'] / 1e9:.1f} GFLOP and F the FLOP rate the small model reached here "
        f"({ob['measured_flops_per_s']['cpu'] / 1e9:.1f} GFLOP/s cpu, {ob['measured_flops_per_s']['wall'] / 1e9:.1f} "
        f"wall): {ob['estimated_step_s']['cpu']:.0f} s cpu. `accumulate` measured at that micro-batch shape, over "
        "the estimated step: "
        + ", ".join(f"{fmt_pct(v)} (K={k})" for k, v in ob["accumulate_fraction_by_K"].items())
        + ". A larger model reaching a higher FLOP rate than F would raise these fractions by that factor.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("figures", help="overhead.json written by overhead.py")
    p.add_argument("--output", default=None, help="markdown path (default: the JSON's path with .md)")
    args = p.parse_args(argv)
    with open(args.figures) as f:
        fig = json.load(f)
    fig.update(analyse(fig))  # recomputed from the measurements
    out = args.output or os.path.splitext(args.figures)[0] + ".md"
    with open(out, "w") as f:
        f.write(render(fig))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
