"""``odm-megatron demo``: online data mixing end to end, on this machine, with no download.

1. build a four-domain corpus from this Python installation (:mod:`odm_megatron.demo_corpus`),
2. train a SentencePiece tokenizer on it (``odm-megatron train-tokenizer``),
3. preprocess train and held-out splits into Megatron shards (``odm-megatron preprocess``),
4. train a small megatron-core GPT with the ``odm-exp3`` policy (``odm-megatron train``),
5. print the per-domain table (prior, final weight, validation perplexity) and write the plot.

The default takes a few minutes on a 2-core CPU; ``--quick`` is a smoke test of under a minute.
Everything lands under ``--output-dir`` (default ``./odm_demo``); the commands it ran are printed,
so each step can be rerun by hand with other settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import List, Optional

from odm_megatron.training.arguments import POLICY_CHOICES

logger = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """A step of the demo failed (its own error message was already printed)."""

# name: (max chars per domain, vocab, layers, hidden, heads, seq, micro batch, global batch, iters, eval every)
PRESETS = {
    "default": dict(max_chars=1_500_000, vocab=4096, layers=4, hidden=256, heads=4, seq=128, mbs=8, gbs=16,
                    iters=300, eval_interval=50, eval_iters=2, lr=1e-3, warmup=20, log_interval=25),
    "quick": dict(max_chars=150_000, vocab=512, layers=2, hidden=64, heads=4, seq=64, mbs=8, gbs=8,
                  iters=30, eval_interval=15, eval_iters=1, lr=2e-3, warmup=3, log_interval=5),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="odm_demo", help="where corpus, tokenizer, shards, logs and plot go")
    parser.add_argument("--quick", action="store_true", help="a tiny version (smoke test, under a minute)")
    parser.add_argument("--train-iters", type=int, default=None, help="training steps (default 300; 30 with --quick)")
    parser.add_argument("--policy", choices=POLICY_CHOICES, default="odm-exp3", help="the mixing policy to show (the paper's EXP3 by default)")
    parser.add_argument("--compare-static", action="store_true",
                        help="also train the same model with the static (natural) mixture and plot both")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the training run")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes for preprocessing")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for training; 0: the cores idle right now (at least 1)")


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


def _train_argv(p: dict, data_dir: str, log_dir: str, iters: int, policy: str, seed: int) -> List[str]:
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
        "--policy", policy, "--prior", "natural", "--update-interval", "1",
        "--eval-interval", str(min(p["eval_interval"], iters)), "--eval-iters", str(p["eval_iters"]),
        "--log-interval", str(p["log_interval"]), "--log-dir", log_dir, "--no-tensorboard",
    ]


def _train(argv: List[str]):
    """``odm-megatron train`` in this process, returning its summary (for the table)."""
    from odm_megatron.training.arguments import add_arguments as add_train_arguments, validate_args
    from odm_megatron.training.parallel import teardown
    from odm_megatron.training.train import run_training

    parser = argparse.ArgumentParser(prog="odm-megatron train")
    add_train_arguments(parser)
    args = validate_args(parser.parse_args(argv))
    logger.info("$ odm-megatron train %s", " ".join(shlex.quote(a) for a in argv))
    try:
        return run_training(args)
    finally:
        teardown()


def _table(summary, baseline=None) -> str:
    names = summary.domain_names
    width = max(10, max(len(n) for n in names))
    evals = (summary.last_eval or {}).get("domains", {})
    base_evals = (baseline.last_eval or {}).get("domains", {}) if baseline else {}
    head = f"{'domain':<{width}}  {'tokens':>7}  {'final weight':>12}  {'val ppl':>9}"
    if baseline:
        head += f"  {'static ppl':>10}"
    lines = [head, "-" * len(head)]
    for name, prior, weight in zip(names, summary.prior, summary.final_weights):
        ppl = evals.get(name, {}).get("ppl", float("nan"))
        line = f"{name:<{width}}  {prior:7.1%}  {weight:12.1%}  {ppl:9.2f}"
        if baseline:
            line += f"  {base_evals.get(name, {}).get('ppl', float('nan')):10.2f}"
        lines.append(line)
    lines.append("-" * len(head))
    avg = (summary.last_eval or {}).get("average", {}).get("ppl", float("nan"))
    line = f"{'average':<{width}}  {'':>7}  {'':>12}  {avg:9.2f}"
    if baseline:
        line += f"  {(baseline.last_eval or {}).get('average', {}).get('ppl', float('nan')):10.2f}"
    lines.append(line)
    return "\n".join(lines)


def run_demo(output_dir: str, quick: bool = False, train_iters: Optional[int] = None, policy: str = "odm-exp3",
             compare_static: bool = False, seed: int = 1234, workers: int = 2, threads: int = 0) -> dict:
    """Run the whole demo; returns paths and the training summary."""
    from odm_megatron.demo_corpus import build_corpus
    from odm_megatron.training.plot import plot_runs

    p = PRESETS["quick" if quick else "default"]
    iters = int(train_iters or p["iters"])
    out = os.path.abspath(output_dir)
    corpus_dir, tok_prefix = os.path.join(out, "corpus"), os.path.join(out, "tokenizer", "demo")
    data_dir, runs_dir = os.path.join(out, "data"), os.path.join(out, "runs")
    t0 = time.time()
    steps = 5 if not compare_static else 6

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

    logger.info("[4/%d] training a %d-layer, %d-wide GPT for %d steps with policy %s", steps, p["layers"],
                p["hidden"], iters, policy)
    import torch

    torch.set_num_threads(choose_threads(threads))
    logger.info("training with %d torch thread(s) (of %d cores; --threads to override)", torch.get_num_threads(),
                os.cpu_count() or 1)
    log_dir = os.path.join(runs_dir, policy)
    summary = _train(_train_argv(p, data_dir, log_dir, iters, policy, seed))
    baseline = None
    log_dirs = [log_dir]
    if compare_static:
        logger.info("[5/%d] the same model with the static natural mixture, for comparison", steps)
        static_dir = os.path.join(runs_dir, "static")
        baseline = _train(_train_argv(p, data_dir, static_dir, iters, "static", seed))
        log_dirs.append(static_dir)

    logger.info("[%d/%d] plotting", steps, steps)
    plot_path = plot_runs(log_dirs, os.path.join(out, "odm_demo.png"),
                          title=f"Online data mixing on this Python installation ({iters} steps)")
    elapsed = time.time() - t0
    return {"summary": summary, "baseline": baseline, "plot": plot_path, "log_dirs": log_dirs,
            "elapsed_s": elapsed, "output_dir": out}


def main(args: argparse.Namespace) -> int:
    from odm_megatron.manifest import ManifestError
    from odm_megatron.training.arguments import ConfigError

    try:
        result = run_demo(args.output_dir, quick=args.quick, train_iters=args.train_iters, policy=args.policy,
                          compare_static=args.compare_static, seed=args.seed, workers=args.workers,
                          threads=args.threads)
    except (ConfigError, ManifestError, DemoError) as e:
        print(f"odm-megatron demo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, ManifestError)) else 1
    summary = result["summary"]
    print()
    print(f"Online data mixing demo: {summary.iteration} steps of policy {args.policy} "
          f"in {result['elapsed_s']:.0f}s (everything under {result['output_dir']})")
    print("'tokens' is each domain's share of the training tokens (the natural mixture); 'final weight' is "
          "where the bandit's sampling weights ended;\n'val ppl' is the held-out perplexity per domain at the end.")
    print()
    print(_table(summary, result["baseline"]))
    print()
    print(f"plot:   {result['plot']}")
    print(f"logs:   {', '.join(result['log_dirs'])}  (mixture.jsonl, eval.jsonl, train.jsonl)")
    print(f"again:  odm-megatron plot {' '.join(result['log_dirs'])}")
    return 0
