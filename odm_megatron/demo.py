"""``odm-megatron demo``: online data mixing end to end, on this machine, with no download.

1. build a four-domain corpus from this Python installation (:mod:`odm_megatron.demo_corpus`),
2. train a SentencePiece tokenizer on it (``odm-megatron train-tokenizer``),
3. preprocess train and held-out splits into Megatron shards (``odm-megatron preprocess``),
4. train the same small megatron-core GPT twice, side by side, on the same data for the same
   steps with the same seed (``odm-megatron train``): once with online mixing (``odm-exp3`` from
   the natural prior, as a Megatron user would start) and once with a static baseline mixture,
5. print per-domain weights and validation perplexities of both runs and their comparison, all
   computed from the two runs' logs, and write one figure of both.

The baseline is the static *uniform* mixture by default: odm-exp3 explores uniformly during its
first K ln K updates (the paper's schedule), so against the natural mixture it would be credited
with what uniform sampling alone gives; the uniform baseline isolates what the online
re-weighting adds. ``--baseline natural`` compares with Megatron's token-proportional blend.

The two runs train concurrently, one process each (two cores: one each). The default took 3m25s
on an idle 2-core CPU (docs/training.md); ``--quick`` is a smoke test of about a minute.
Everything lands
under ``--output-dir`` (default ``./odm_demo``); the commands it ran are printed, so each step can
be rerun by hand with other settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from odm_megatron.policy import DEFAULT_POLICY
from odm_megatron.training.arguments import POLICY_CHOICES

logger = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """A step of the demo failed (its own error message was already printed)."""

# name: (max chars per domain, vocab, layers, hidden, heads, seq, micro batch, global batch, iters, eval every)
PRESETS = {
    "default": dict(max_chars=1_500_000, vocab=4096, layers=4, hidden=256, heads=4, seq=128, mbs=8, gbs=16,
                    iters=300, eval_interval=50, eval_iters=2, lr=1e-3, warmup=20, log_interval=25),
    "quick": dict(max_chars=150_000, vocab=512, layers=2, hidden=64, heads=4, seq=64, mbs=8, gbs=8,
                  iters=30, eval_interval=10, eval_iters=1, lr=2e-3, warmup=3, log_interval=5),
}
BASELINES = ("uniform", "natural")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="odm_demo", help="where corpus, tokenizer, shards, logs and plot go")
    parser.add_argument("--quick", action="store_true", help="a tiny version (smoke test, about a minute)")
    parser.add_argument("--train-iters", type=int, default=None, help="training steps of each run (default 300; 30 with --quick)")
    parser.add_argument("--policy", choices=[p for p in POLICY_CHOICES if p != "static"], default=DEFAULT_POLICY,
                        help="the online mixing policy to show")
    parser.add_argument("--baseline", choices=BASELINES, default="uniform",
                        help="the static mixture trained beside it: uniform (every domain the same share; the "
                             "honest yardstick for odm-exp3, which starts out uniform) or natural (token-"
                             "proportional, Megatron's usual blend)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of both training runs")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes for preprocessing")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of each training run; 0: half the cores idle right now (at least 1)")


def idle_cores(interval_s: float = 0.5) -> Optional[float]:
    """How many cores were idle over the last ``interval_s`` seconds (Linux /proc/stat), or None."""
    def snapshot():
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = snapshot()
        time.sleep(interval_s)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def choose_threads(requested: int) -> int:
    """Training threads: ``requested``, or as many as there are idle cores. An OpenMP team larger
    than the free cores is far slower than a small one (threads wait for descheduled peers at
    every parallel region): on a busy 2-core machine one thread ran 3x faster than two."""
    import torch

    if requested > 0:
        return requested
    cores = torch.get_num_threads()
    idle = idle_cores()
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))


def _run_subcommand(argv: List[str]) -> None:
    """Run another ``odm-megatron`` sub-command in this process; raise on failure."""
    from odm_megatron.cli import main as cli_main

    logger.info("$ odm-megatron %s", " ".join(shlex.quote(a) for a in argv))
    rc = cli_main(argv)
    if rc != 0:
        raise DemoError(f"`odm-megatron {argv[0]}` failed with exit code {rc} (its message is above)")


def _train_argv(p: dict, data_dir: str, log_dir: str, iters: int, policy: str, prior: str, seed: int,
                threads: int) -> List[str]:
    return [
        "--manifest", os.path.join(data_dir, "train", "manifest.json"),
        "--valid-manifest", os.path.join(data_dir, "valid", "manifest.json"),
        "--num-layers", str(p["layers"]), "--hidden-size", str(p["hidden"]),
        "--num-attention-heads", str(p["heads"]), "--seq-length", str(p["seq"]),
        "--max-position-embeddings", str(p["seq"]),
        "--micro-batch-size", str(p["mbs"]), "--global-batch-size", str(p["gbs"]),
        "--train-iters", str(iters), "--lr", str(p["lr"]), "--min-lr", str(p["lr"] / 10),
        "--lr-warmup-iters", str(min(p["warmup"], max(1, iters // 10))),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", str(seed),
        "--policy", policy, "--prior", prior, "--update-interval", "1",
        "--eval-interval", str(min(p["eval_interval"], iters)), "--eval-iters", str(p["eval_iters"]),
        "--log-interval", str(p["log_interval"]), "--log-dir", log_dir, "--no-tensorboard",
        "--data-cache-path", os.path.join(log_dir, "index_cache"),  # concurrent runs never share a cache
        "--threads", str(threads),
    ]


def _train_concurrently(runs: Dict[str, List[str]], console: str) -> None:
    """``odm-megatron train`` once per entry of ``runs`` (label -> argv), all at once, one process
    each. The ``console`` run's progress goes to stderr; every run's output to LOG_DIR/console.log."""
    import odm_megatron

    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(odm_megatron.__file__)))
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = {}
    for label, argv in runs.items():
        log_dir = argv[argv.index("--log-dir") + 1]
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, "console.log")
        logger.info("$ odm-megatron train %s", " ".join(shlex.quote(a) for a in argv))
        out = open(log_path, "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "odm_megatron", "train", *argv]
        procs[label] = (subprocess.Popen(cmd, stdout=out, stderr=None if label == console else subprocess.STDOUT,
                                         env=env), out, log_path)
    failed = []
    for label, (proc, out, log_path) in procs.items():
        rc = proc.wait()
        out.close()
        if rc != 0:
            failed.append(f"{label} (exit code {rc}; see {log_path})")
    if failed:
        raise DemoError(f"training failed: {', '.join(failed)}")


def _final_eval(run: dict) -> dict:
    if not run["eval"]:
        raise DemoError(f"run {run['label']} wrote no evaluation (eval.jsonl is empty)")
    return run["eval"][-1]


def compare_runs(online: dict, baseline: dict, token_share: Dict[str, float]) -> dict:
    """Figures of the comparison, computed from two runs' logs (:func:`~odm_megatron.training.plot.load_run`)."""
    final_on, final_base = _final_eval(online), _final_eval(baseline)
    updates = [r for r in online["mixture"] if int(r.get("update", 1)) > 0]
    domains = []
    for name in final_on["domains"]:
        weights = [float(r["weights"][name]) for r in updates] or [float("nan")]
        on_ppl = final_on["domains"][name]["ppl"]
        base_ppl = final_base["domains"].get(name, {}).get("ppl", float("nan"))
        domains.append({"name": name, "tokens": token_share.get(name, float("nan")),
                        "baseline_weight": float(baseline["mixture"][-1]["weights"].get(name, float("nan"))),
                        "final_weight": weights[-1], "min_weight": min(weights), "max_weight": max(weights),
                        "ppl": on_ppl, "baseline_ppl": base_ppl, "ratio": on_ppl / base_ppl})
    avg_on, avg_base = final_on["average"]["ppl"], final_base["average"]["ppl"]
    reached = next((int(e["step"]) for e in online["eval"] if e["average"]["ppl"] <= avg_base), None)
    result = {"step": int(final_on["step"]), "domains": domains,
              "average": {"ppl": avg_on, "baseline_ppl": avg_base, "ratio": avg_on / avg_base},
              "reached_baseline_final_at": reached}
    if "token_weighted" in final_on and "token_weighted" in final_base:
        tw_on, tw_base = final_on["token_weighted"]["ppl"], final_base["token_weighted"]["ppl"]
        result["token_weighted"] = {"ppl": tw_on, "baseline_ppl": tw_base, "ratio": tw_on / tw_base}
    return result


def format_comparison(c: dict, online: str, baseline: str) -> str:
    """The printed table and the sentences it supports (every number from ``c``)."""
    width = max(14, *(len(d["name"]) for d in c["domains"]))
    head = (f"{'domain':<{width}}  {'tokens':>6}  {baseline + ' w':>10}  {online + ' w (min-max)':>26}  "
            f"{online + ' ppl':>13}  {baseline + ' ppl':>12}  {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for d in c["domains"]:
        span = f"{d['final_weight']:.1%} ({d['min_weight']:.1%}-{d['max_weight']:.1%})"
        lines.append(f"{d['name']:<{width}}  {d['tokens']:6.1%}  {d['baseline_weight']:10.1%}  {span:>26}  "
                     f"{d['ppl']:13.2f}  {d['baseline_ppl']:12.2f}  {d['ratio']:6.3f}")
    lines.append("-" * len(head))
    rows = [("average", c["average"])] + ([("token-weighted", c["token_weighted"])] if "token_weighted" in c else [])
    for label, r in rows:
        lines.append(f"{label:<{width}}  {'':>6}  {'':>10}  {'':>26}  {r['ppl']:13.2f}  {r['baseline_ppl']:12.2f}  "
                     f"{r['ratio']:6.3f}")
    ratio = c["average"]["ratio"]
    direction = "below" if ratio < 1 else "above" if ratio > 1 else "equal to"
    lines.append("")
    lines.append(f"At step {c['step']}, {online}'s average validation perplexity is {c['average']['ppl']:.2f}, "
                 f"{abs(ratio - 1):.1%} {direction} the {baseline} run's {c['average']['baseline_ppl']:.2f} "
                 f"(ratio {ratio:.3f}; below 1 favours {online}).")
    if c["reached_baseline_final_at"] is not None:
        lines.append(f"{online} reached the {baseline} run's final average perplexity at step "
                     f"{c['reached_baseline_final_at']} of {c['step']}.")
    else:
        lines.append(f"{online} did not reach the {baseline} run's final average perplexity within {c['step']} steps.")
    moved = max(max(abs(d["max_weight"] - d["baseline_weight"]), abs(d["min_weight"] - d["baseline_weight"]))
                for d in c["domains"])
    lines.append(f"{online}'s weights came at most {moved:.1%} (absolute) from the {baseline} weights over the run.")
    lines.append("One seed of a small model: a difference of a few percent can be seed noise "
                 "(docs/benchmarks.md compares policies over several seeds).")
    return "\n".join(lines)


def _token_share(manifest_path: str) -> Dict[str, float]:
    from odm_megatron.manifest import Manifest

    manifest = Manifest.load(manifest_path)
    total = sum(d.tokens for d in manifest.domains)
    return {d.name: d.tokens / total for d in manifest.domains}


def run_demo(output_dir: str, quick: bool = False, train_iters: Optional[int] = None, policy: str = DEFAULT_POLICY,
             baseline: str = "uniform", seed: int = 1234, workers: int = 2, threads: int = 0) -> dict:
    """Run the whole demo; returns paths, the two runs' logs (plot.load_run) and the comparison."""
    from odm_megatron.demo_corpus import build_corpus
    from odm_megatron.training.plot import load_run, plot_comparison

    if baseline not in BASELINES:
        raise DemoError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
    p = PRESETS["quick" if quick else "default"]
    iters = int(train_iters or p["iters"])
    out = os.path.abspath(output_dir)
    corpus_dir, tok_prefix = os.path.join(out, "corpus"), os.path.join(out, "tokenizer", "demo")
    data_dir, runs_dir = os.path.join(out, "data"), os.path.join(out, "runs")
    t0 = time.time()
    steps = 5

    logger.info("[1/%d] building a multi-domain corpus from this Python installation -> %s", steps, corpus_dir)
    corpus = build_corpus(corpus_dir, max_chars_per_domain=p["max_chars"],
                          min_valid_chars=20_000 if quick else 40_000)

    logger.info("[2/%d] training a %d-piece SentencePiece BPE tokenizer", steps, p["vocab"])
    os.makedirs(os.path.dirname(tok_prefix), exist_ok=True)
    _run_subcommand(["train-tokenizer", "--input", corpus.train_path, "--vocab-size", str(p["vocab"]),
                     "--model-type", "bpe", "--output", tok_prefix, "--sample-bytes", "2M", "--seed", "0"])

    logger.info("[3/%d] tokenizing into per-domain Megatron shards -> %s", steps, data_dir)
    for split, path in (("train", corpus.train_path), ("valid", corpus.valid_path)):
        _run_subcommand(["preprocess", "--input", path, "--tokenizer-model", tok_prefix + ".model",
                         "--output-dir", os.path.join(data_dir, split), "--workers", str(workers),
                         "--append-eod", "--overwrite", "--no-progress"])

    # A demo run owns its runs/: a repeated demo starts both runs afresh (train refuses, rightly, to
    # start a new run over an earlier run's logs).
    shutil.rmtree(runs_dir, ignore_errors=True)
    per_run = threads if threads > 0 else max(1, choose_threads(0) // 2)
    static_label = f"static {baseline}"
    online_dir, static_dir = os.path.join(runs_dir, policy), os.path.join(runs_dir, f"static-{baseline}")
    logger.info("[4/%d] training a %d-layer, %d-wide GPT for %d steps twice, side by side (%d torch thread(s) "
                "each; --threads to override): %s from the natural prior (progress below), and %s (log in %s)",
                steps, p["layers"], p["hidden"], iters, per_run, policy, static_label,
                os.path.join(static_dir, "console.log"))
    _train_concurrently({
        policy: _train_argv(p, data_dir, online_dir, iters, policy, "natural", seed, per_run),
        static_label: _train_argv(p, data_dir, static_dir, iters, "static", baseline, seed, per_run),
    }, console=policy)

    logger.info("[5/%d] comparing the runs and plotting", steps)
    online, static = load_run(online_dir), load_run(static_dir)
    comparison = compare_runs(online, static, _token_share(os.path.join(data_dir, "train", "manifest.json")))
    plot_path = plot_comparison(online_dir, static_dir, os.path.join(out, "odm_demo.png"),
                                title=f"{policy} vs the static {baseline} mixture: same corpus, model, seed and "
                                      f"{iters} steps", labels=(policy, static_label))
    return {"online": online, "baseline": static, "comparison": comparison, "plot": plot_path,
            "log_dirs": [online_dir, static_dir], "elapsed_s": time.time() - t0, "output_dir": out,
            "iters": iters, "threads": per_run}


def main(args: argparse.Namespace) -> int:
    from odm_megatron.manifest import ManifestError
    from odm_megatron.training.arguments import ConfigError

    try:
        result = run_demo(args.output_dir, quick=args.quick, train_iters=args.train_iters, policy=args.policy,
                          baseline=args.baseline, seed=args.seed, workers=args.workers, threads=args.threads)
    except (ConfigError, ManifestError, DemoError) as e:
        print(f"odm-megatron demo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, ManifestError)) else 1
    static = f"static {args.baseline}"
    print()
    print(f"Online data mixing demo: {args.policy} and the {static} mixture, {result['iters']} steps each on the same "
          f"corpus, model and seed, in {result['elapsed_s']:.0f}s (everything under {result['output_dir']})")
    print(f"'tokens' is each domain's share of the training tokens (the natural mixture, where {args.policy} "
          f"starts); 'w' are sampling weights ({args.policy}: final, and the range over the run);")
    print("'ppl' is the validation perplexity per domain at the last step; 'ratio' is "
          f"{args.policy} / {static} (below 1: {args.policy} is better).")
    if args.baseline == "uniform":
        print(f"Why uniform: {args.policy} starts from the natural mixture but its first updates explore uniformly, "
              "so against the natural mixture it would get credit for what uniform sampling alone gives; the "
              "uniform baseline shows what the online re-weighting itself adds.")
    print()
    print(format_comparison(result["comparison"], args.policy, static))
    print()
    print(f"plot:   {result['plot']}")
    print(f"logs:   {', '.join(result['log_dirs'])}  (mixture.jsonl, eval.jsonl, train.jsonl, console.log)")
    print(f"again:  odm-megatron plot {' '.join(result['log_dirs'])}")
    return 0
