"""``odm-megatron plot``: mixing weights and per-domain validation perplexity from log dirs.

One column per run (log dir): on top the sampling weights over training steps as stacked areas
(weights decided by an update are drawn from the step they take effect), below each domain's
validation perplexity and the unweighted average (dashed); held-out validation domains (never
trained on) are drawn dotted, with their own average. A domain keeps its colour in every column,
so runs with different policies can be compared side by side; columns whose log dirs share a
name are titled with as much of their paths as tells them apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)


class PlotError(ValueError):
    pass


AVERAGE_STYLE = dict(color="black", ls="--", lw=1.5, label="average (trained domains, unweighted)")
HELD_OUT_STYLE = dict(ls=":", lw=1.2)
HELD_OUT_AVERAGE_STYLE = dict(color="dimgrey", ls=":", lw=2.0, label="held-out average")


def _read_jsonl(path: str) -> List[dict]:
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return rows


def run_label(log_dir: str) -> str:
    """A readable name for a run: the log dir's name, or its parent's when it is called 'logs'."""
    path = os.path.normpath(os.path.abspath(log_dir))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name in ("logs", "log") else name


def run_labels(log_dirs: Sequence[str]) -> List[str]:
    """Distinct column titles: :func:`run_label`, lengthened to ``parent/name`` (and further up
    the path) for runs whose labels would otherwise be the same."""
    parts = [[p for p in os.path.normpath(os.path.abspath(d)).split(os.sep) if p] for d in log_dirs]
    labels = [run_label(d) for d in log_dirs]
    for depth in range(2, max(map(len, parts), default=0) + 1):
        same = {label for label in labels if labels.count(label) > 1}
        if not same:
            break
        labels = ["/".join(p[-depth:]) if label in same else label for p, label in zip(parts, labels)]
    return labels


def load_run(log_dir: str) -> Dict[str, object]:
    mixture = _read_jsonl(os.path.join(log_dir, "mixture.jsonl"))
    evals = _read_jsonl(os.path.join(log_dir, "eval.jsonl"))
    if not mixture and not evals:
        raise PlotError(f"{log_dir}: no mixture.jsonl or eval.jsonl (is it an `odm-megatron train --log-dir`?)")
    domains: List[str] = []
    for row in mixture:
        for name in row.get("weights", {}):
            if name not in domains:
                domains.append(name)
    held_out: List[str] = []  # validation domains never trained on (absent from older eval.jsonl files)
    for row in evals:
        for name in row.get("domains", {}):
            if name not in domains:
                domains.append(name)
        for name in row.get("held_out", {}):
            if name not in held_out:
                held_out.append(name)
    train = _read_jsonl(os.path.join(log_dir, "train.jsonl"))
    steps = [int(r["step"]) for r in train + mixture + evals if "step" in r]
    return {"label": run_label(log_dir), "mixture": mixture, "eval": evals, "domains": domains,
            "held_out": held_out, "last_step": max(steps) if steps else 1}


def plot_runs(log_dirs: Sequence[str], output: str, title: Optional[str] = None,
              labels: Optional[Sequence[str]] = None) -> str:
    """Write the comparison PNG for ``log_dirs`` to ``output``; returns the path.

    ``labels`` names the columns (default: :func:`run_labels`)."""
    import matplotlib.pyplot as plt

    fig = build_figure(log_dirs, title, labels)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def build_figure(log_dirs: Sequence[str], title: Optional[str] = None, labels: Optional[Sequence[str]] = None):
    """The comparison figure (a matplotlib Figure; the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    runs = [load_run(d) for d in log_dirs]
    if labels is not None and len(labels) != len(runs):
        raise PlotError(f"{len(labels)} labels for {len(runs)} runs")
    for run, label in zip(runs, labels if labels is not None else run_labels(log_dirs)):
        run["label"] = label
    all_domains: List[str] = []
    for run in runs:
        all_domains += [d for d in run["domains"] + run["held_out"] if d not in all_domains]
    cmap = plt.get_cmap("tab10" if len(all_domains) <= 10 else "tab20")
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(all_domains)}

    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n + 2.5, 7.5), squeeze=False, sharex="col")
    for col, run in enumerate(runs):
        ax_w, ax_p = axes[0][col], axes[1][col]
        domains = run["domains"]
        last_step = run["last_step"]
        mixture = sorted(run["mixture"], key=lambda r: r.get("effective_step", r["step"]))
        # Updates at the very end take effect after the run's last step: nothing was sampled with them.
        mixture = [r for r in mixture if int(r.get("effective_step", r["step"])) <= max(1, last_step)]
        if mixture:
            xs = [max(1, int(r.get("effective_step", r["step"]))) for r in mixture]
            xs.append(max(last_step, xs[-1]))  # extend the last weights to the end of the run
            ys = [[float(r["weights"].get(d, 0.0)) for r in mixture] for d in domains]
            ys = [y + [y[-1]] for y in ys]
            ax_w.stackplot(xs, ys, labels=domains, colors=[colours[d] for d in domains], step="post", alpha=0.9)
            ax_w.set_ylim(0, 1)
            ax_w.set_xlim(xs[0], xs[-1])
        else:
            ax_w.text(0.5, 0.5, "no mixture.jsonl", ha="center", va="center", transform=ax_w.transAxes)
        ax_w.set_title(run["label"])
        ax_w.set_ylabel("sampling weight")

        if run["eval"]:
            steps = [int(e["step"]) for e in run["eval"]]
            for d in domains:
                ppl = [e["domains"].get(d, {}).get("ppl", float("nan")) for e in run["eval"]]
                ax_p.plot(steps, ppl, marker="o", ms=3, color=colours[d], label=d)
            avg = [e.get("average", {}).get("ppl", float("nan")) for e in run["eval"]]
            ax_p.plot(steps, avg, **AVERAGE_STYLE)
            for d in run["held_out"]:
                ppl = [e.get("held_out", {}).get(d, {}).get("ppl", float("nan")) for e in run["eval"]]
                ax_p.plot(steps, ppl, marker="o", ms=3, color=colours[d], **HELD_OUT_STYLE)
            if run["held_out"]:
                avg = [(e.get("held_out_average") or {}).get("ppl", float("nan")) for e in run["eval"]]
                ax_p.plot(steps, avg, **HELD_OUT_AVERAGE_STYLE)
            ax_p.set_yscale("log")
            ax_p.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax_p.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax_p.text(0.5, 0.5, "no eval.jsonl", ha="center", va="center", transform=ax_p.transAxes)
        ax_p.set_xlabel("step")
        ax_p.set_ylabel("validation perplexity")
        ax_p.grid(True, alpha=0.3, which="both")

    from matplotlib.lines import Line2D

    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[d]) for d in all_domains]
    names = list(all_domains)
    if any(run["eval"] for run in runs):
        handles.append(Line2D([], [], **AVERAGE_STYLE))
        names.append(AVERAGE_STYLE["label"])
    if any(run["held_out"] for run in runs):
        handles += [Line2D([], [], color="grey", **HELD_OUT_STYLE), Line2D([], [], **HELD_OUT_AVERAGE_STYLE)]
        names += ["held-out domain (dotted)", HELD_OUT_AVERAGE_STYLE["label"]]
    fig.legend(handles, names, loc="center right", title="domain", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (5.5 * n + 2.5), 1))
    return fig


def plot_comparison(online_dir: str, baseline_dir: str, output: str, title: Optional[str] = None,
                    labels: Sequence[str] = ("online", "baseline")) -> str:
    """One figure comparing an online run with a static baseline trained on the same data: the
    online run's weights over steps (the baseline's fixed mixture drawn as dashed boundaries), each
    domain's validation perplexity (online solid, baseline dashed) and the average perplexity of
    both. Writes the PNG to ``output`` and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    online, baseline = load_run(online_dir), load_run(baseline_dir)
    domains = list(online["domains"]) + [d for d in baseline["domains"] if d not in online["domains"]]
    cmap = plt.get_cmap("tab10" if len(domains) <= 10 else "tab20")
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(domains)}
    fig, (ax_w, ax_d, ax_a) = plt.subplots(1, 3, figsize=(17, 5.2))

    last_step = max(online["last_step"], baseline["last_step"])
    mixture = sorted(online["mixture"], key=lambda r: r.get("effective_step", r["step"]))
    mixture = [r for r in mixture if int(r.get("effective_step", r["step"])) <= max(1, last_step)]
    if mixture:
        xs = [max(1, int(r.get("effective_step", r["step"]))) for r in mixture] + [last_step]
        ys = [[float(r["weights"].get(d, 0.0)) for r in mixture] for d in domains]
        ax_w.stackplot(xs, [y + [y[-1]] for y in ys], colors=[colours[d] for d in domains], step="post", alpha=0.9)
        ax_w.set_xlim(xs[0], xs[-1])
    if baseline["mixture"]:
        fixed = baseline["mixture"][-1]["weights"]
        edge = 0.0
        for d in domains[:-1]:
            edge += float(fixed.get(d, 0.0))
            ax_w.axhline(edge, color="black", ls="--", lw=1.0)
    ax_w.set_ylim(0, 1)
    ax_w.set_title(f"{labels[0]}: sampling weights (dashed: {labels[1]}'s fixed mixture)", fontsize=10)
    ax_w.set_xlabel("step")
    ax_w.set_ylabel("sampling weight")

    def curve(run, key, name=None):
        rows = run["eval"]
        values = [(r.get(key) or {}).get(name, {}) if name else (r.get(key) or {}) for r in rows]
        return [int(r["step"]) for r in rows], [v.get("ppl", float("nan")) for v in values]

    for d in domains:
        for run, ls in ((online, "-"), (baseline, "--")):
            steps, ppl = curve(run, "domains", d)
            ax_d.plot(steps, ppl, color=colours[d], ls=ls, marker="o", ms=2.5)
    ax_d.set_title("validation perplexity per domain", fontsize=10)
    for run, ls, label in ((online, "-", labels[0]), (baseline, "--", labels[1])):
        steps, ppl = curve(run, "average")
        ax_a.plot(steps, ppl, color="black", ls=ls, marker="o", ms=3, label=label)
    ax_a.set_title("average validation perplexity (domains weighted equally)", fontsize=10)
    ax_a.legend(frameon=False)
    for ax in (ax_d, ax_a):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3, which="both")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[d]) for d in domains]
    handles += [Line2D([], [], color="grey", ls="-"), Line2D([], [], color="grey", ls="--")]
    fig.legend(handles, domains + [labels[0], labels[1]], loc="center right", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.89, 1))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_dirs", nargs="+", metavar="LOG_DIR", help="--log-dir of one or more training runs")
    parser.add_argument("--output", "-o", default=None,
                        help="PNG path (default: LOG_DIR/odm_plot.png for one run, ./odm_plot.png for several)")
    parser.add_argument("--title", default=None, help="a title above the figure (default: none)")


def main(args: argparse.Namespace) -> int:
    output = args.output or (os.path.join(args.log_dirs[0], "odm_plot.png") if len(args.log_dirs) == 1
                             else "odm_plot.png")
    try:
        path = plot_runs(args.log_dirs, output, title=args.title)
    except PlotError as e:
        print(f"odm-megatron plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
