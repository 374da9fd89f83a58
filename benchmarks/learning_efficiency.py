#!/usr/bin/env python
"""Does online mixing pay off? Steps to reach the static mixes' final perplexity, per policy.

On mini_pile (10 real domains of very unequal size and difficulty): one SentencePiece BPE
tokenizer and one preprocessing shared by every run; a small megatron-core GPT trained with
``odm-megatron train`` under each policy and seed (same initialisation and data seed for every
policy of a seed); per-domain validation perplexity every ``--eval-interval`` steps. Figures of
merit, as the ODM paper reports them:

- ``steps_fraction_to_natural``: steps an online policy needs to reach the final average
  validation perplexity of the static ``natural`` mix (token-proportional, like The Pile's own
  weights), as a fraction of that run's steps;
- ``steps_fraction_to_best_static``: the same against the best static mix (lowest mean final
  average perplexity over seeds; usually ``uniform`` on this unweighted average).

"Average" is the unweighted mean of the per-domain perplexities (the paper's headline metric);
the token-weighted perplexity (domains weighted by their share of training tokens) is reported
too, because the unweighted average favours near-uniform mixes.

Usage (the full run documented in docs/benchmarks.md)::

    python benchmarks/learning_efficiency.py --seeds 1 2 3 --train-iters 600
    python benchmarks/learning_efficiency.py --smoke --output /tmp/le   # seconds, synthetic data
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "mini_pile")

# name -> (policy, prior, extra train flags)
FITTED_PRIOR = "@fitted"
MIN_LOG_SHARE_RATIO = math.log(1.4)  # fitted-static: shares must differ by 1.4x to fit a domain
POLICY_RUNS: Dict[str, tuple] = {
    "natural": ("static", "natural", []),
    "uniform": ("static", "uniform", []),
    "odm-exp3": ("odm-exp3", "natural", []),
    "smoothed-mean": ("smoothed-mean", "natural", []),
    "odm-progress": ("odm-progress", "natural", []),
    # variants for exploring odm-progress (not run by default)
    "odm-progress-eta0.1": ("odm-progress", "natural", ["--odm-eta", "0.1"]),
    "odm-progress-trend": ("odm-progress", "natural", ["--odm-trend-alpha", "0.99"]),
    # a ceiling, not a policy: the static mix that a per-domain response model fitted to this
    # invocation's natural and uniform runs says is best (see fitted_static_mix); runs after them
    "fitted-static": ("static", FITTED_PRIOR, []),
    "odm-progress-ui10": ("odm-progress", "natural", ["--update-interval", "10", "--odm-eta", "0.2"]),
}
DEFAULT_RUNS = ["natural", "uniform", "odm-exp3", "smoothed-mean", "odm-progress", "fitted-static"]
STATIC_RUNS = ("natural", "uniform")

logger = logging.getLogger("learning_efficiency")


def _odm(*argv: str, log: Optional[str] = None, threads: int = 1) -> None:
    """Run ``python -m odm_megatron ARGV`` (1 torch thread per run: two runs share 2 cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "odm_megatron", *argv]
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        result = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    finally:
        if log:
            out.close()
    if result.returncode != 0:
        tail = open(log).read()[-3000:] if log else ""
        raise RuntimeError(f"failed ({result.returncode}): {' '.join(cmd)}\n{tail}")


# -- data ---------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, work: str) -> Dict[str, str]:
    """Tokenizer + train/valid shards, made once and reused by every run (and by reruns)."""
    paths = {
        "tokenizer": os.path.join(work, "tokenizer"),
        "train": os.path.join(work, "data", "train"),
        "valid": os.path.join(work, "data", "valid"),
    }
    if args.smoke:
        inputs = _smoke_corpus(work)
    else:
        inputs = {"train": [os.path.join(args.data_dir, "train", "00.jsonl.zst")],
                  "valid": [os.path.join(args.data_dir, "val.jsonl.zst")]}
        for files in inputs.values():
            for f in files:
                if not os.path.isfile(f):
                    raise SystemExit(f"learning_efficiency: input not found: {f} (set --data-dir)")
    if not os.path.isfile(paths["tokenizer"] + ".model"):
        logger.info("training the tokenizer (%d-piece BPE)", args.vocab_size)
        _odm("train-tokenizer", "--input", *inputs["train"], "--vocab-size", str(args.vocab_size),
             "--model-type", "bpe", "--output", paths["tokenizer"], "--sample-bytes", str(args.tokenizer_sample_bytes),
             log=os.path.join(work, "tokenizer.log"), threads=2)
    for split in ("train", "valid"):
        if not os.path.isfile(os.path.join(paths[split], "manifest.json")):
            logger.info("preprocessing the %s split", split)
            _odm("preprocess", "--input", *inputs[split], "--tokenizer-model", paths["tokenizer"] + ".model",
                 "--output-dir", paths[split], "--workers", "2", "--append-eod", "--overwrite",
                 log=os.path.join(work, f"preprocess_{split}.log"), threads=1)
    return paths


def _smoke_corpus(work: str) -> Dict[str, List[str]]:
    from odm_megatron.preprocess.fixtures import jsonl_bytes, make_documents

    files = {}
    for split, seed, n in (("train", 0, 60), ("valid", 1, 12)):
        path = os.path.join(work, f"smoke_{split}.jsonl")
        # unequal sizes, so natural and uniform differ enough for the fitted-static run
        docs = make_documents({"Pile-CC": 2 * n, "Github": n, "DM Mathematics": n // 3}, words_per_doc=120, seed=seed)
        with open(path, "wb") as f:
            f.write(jsonl_bytes(docs))
        files[split] = [path]
    return files


# -- runs ---------------------------------------------------------------------------------
def train_flags(args: argparse.Namespace) -> List[str]:
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size),
        "--train-iters", str(args.train_iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-warmup-iters", str(max(1, args.train_iters // 12)), "--weight-decay", "0.1",
        "--update-interval", str(args.update_interval), "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters), "--no-tensorboard", "--log-interval", str(args.eval_interval),
    ]


def run_one(args: argparse.Namespace, paths: Dict[str, str], work: str, name: str, seed: int) -> str:
    """Train one (policy, seed) run, or reuse a finished one made with the same flags."""
    log_dir = os.path.join(work, "runs", name, f"seed{seed}")
    done = os.path.join(log_dir, "DONE")
    policy, prior, extra = POLICY_RUNS[name]
    if prior == FITTED_PRIOR:
        prior = os.path.join(work, "fitted_static_mix.json")
    config = {"policy": policy, "prior": os.path.basename(prior), "seed": seed, "flags": train_flags(args) + extra}
    config_path = os.path.join(log_dir, "run_config.json")
    if os.path.isfile(done):
        if os.path.isfile(config_path):
            with open(config_path) as f:
                made_with = json.load(f)
            if made_with != config:
                raise SystemExit(f"learning_efficiency: {log_dir} was made with other settings ({made_with['flags']}); "
                                 f"use another --work-dir or delete it")
        else:
            logger.warning("reusing %s, made before run settings were recorded", log_dir)
        return log_dir
    os.makedirs(log_dir, exist_ok=True)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    for stale in ("eval.jsonl", "train.jsonl", "mixture.jsonl"):
        if os.path.exists(os.path.join(log_dir, stale)):
            os.unlink(os.path.join(log_dir, stale))
    t0 = time.time()
    _odm("train", "--manifest", os.path.join(paths["train"], "manifest.json"),
         "--valid-manifest", os.path.join(paths["valid"], "manifest.json"),
         "--data-cache-path", os.path.join(work, "cache"),
         "--policy", policy, "--prior", prior, "--seed", str(seed), "--log-dir", log_dir,
         *train_flags(args), *extra, log=os.path.join(log_dir, "console.log"), threads=args.threads_per_run)
    with open(done, "w") as f:
        f.write(f"{time.time() - t0:.1f}\n")
    logger.info("finished %s seed %d in %.0fs", name, seed, time.time() - t0)
    return log_dir


# -- analysis -----------------------------------------------------------------------------
def fitted_static_mix(natural: Dict[str, float], uniform: Dict[str, float],
                      natural_shares: Dict[str, float]) -> Dict[str, dict]:
    """The static mix a per-domain power law fitted to two static runs says minimises the
    unweighted average perplexity.

    Model: ``ppl_i(s_i) = ppl_i(uniform) * (s_i / u)^(-e_i)``, with the elasticity ``e_i`` from
    the final perplexities of the natural and uniform runs (two shares per domain). The average's
    minimum over the simplex has ``e_i * ppl_i(s_i) / s_i`` equal for all i (a fixed point).
    This uses what no online policy knows (two finished runs) and ignores transfer between
    domains: it estimates how much any reallocation of samples could buy at this budget.
    """
    names = sorted(uniform)
    u = 1.0 / len(names)
    elasticity = {}
    for d in names:
        ratio = math.log(u / natural_shares[d])
        # where the two runs gave a domain nearly the same share, its perplexity difference is
        # other domains' doing: no estimate (the median of the others stands in)
        if abs(ratio) >= MIN_LOG_SHARE_RATIO:
            elasticity[d] = min(max(-math.log(uniform[d] / natural[d]) / ratio, 0.01), 2.0)
    if not elasticity:
        raise ValueError("fitted_static_mix: no domain's share differs enough between natural and uniform")
    median = sorted(elasticity.values())[len(elasticity) // 2]
    unidentified = [d for d in names if d not in elasticity]
    elasticity.update({d: median for d in unidentified})
    predicted = lambda s: {d: uniform[d] * (s[d] / u) ** (-elasticity[d]) for d in names}
    shares = {d: u for d in names}
    for _ in range(500):
        ppl = predicted(shares)
        raw = {d: elasticity[d] * ppl[d] for d in names}
        total = sum(raw.values())
        shares = {d: 0.5 * shares[d] + 0.5 * raw[d] / total for d in names}  # damped fixed point
    ppl = predicted(shares)
    return {"shares": shares, "elasticity": elasticity, "elasticity_not_identified": unidentified,
            "predicted_avg_ppl": sum(ppl.values()) / len(names),
            "predicted_uniform_avg_ppl": sum(uniform.values()) / len(names)}


def read_evals(log_dir: str) -> List[dict]:
    rows = []
    with open(os.path.join(log_dir, "eval.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return sorted(rows, key=lambda r: r["step"])


def token_weighted_ppl(row: dict, shares: Dict[str, float]) -> float:
    return math.exp(sum(shares[d] * r["loss"] for d, r in row["domains"].items()))


def steps_to_reach(curve: Sequence[tuple], target: float) -> Optional[float]:
    """First step at which ``curve`` ([(step, ppl)], ascending steps) gets to ``target``, with
    linear interpolation between evaluations; None if it never does."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None or prev[1] == value:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        prev = (step, value)
    return None


def _summary(values: List[Optional[float]]) -> dict:
    reached = [v for v in values if v is not None]
    out = {"per_seed": values, "reached": f"{len(reached)}/{len(values)}"}
    out["mean"] = sum(reached) / len(reached) if reached and len(reached) == len(values) else None
    if reached and len(reached) == len(values) and len(values) > 1:
        m = out["mean"]
        out["std"] = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return out


def analyse(runs: Dict[str, Dict[int, str]], shares: Dict[str, float], train_iters: int) -> dict:
    curves, finals, finals_tw, final_domains = {}, {}, {}, {}
    for name, by_seed in runs.items():
        for seed, log_dir in by_seed.items():
            rows = read_evals(log_dir)
            curves[(name, seed)] = [(r["step"], r["average"]["ppl"]) for r in rows]
            finals.setdefault(name, {})[seed] = rows[-1]["average"]["ppl"]
            finals_tw.setdefault(name, {})[seed] = token_weighted_ppl(rows[-1], shares)
            final_domains.setdefault(name, {})[seed] = {d: r["ppl"] for d, r in rows[-1]["domains"].items()}
    seeds = sorted(next(iter(runs.values())).keys())
    mean = lambda xs: sum(xs) / len(xs)
    statics = [s for s in STATIC_RUNS if s in runs]
    best_static = min(statics, key=lambda s: mean(list(finals[s].values())))
    policies = {}
    for name in runs:
        entry = {
            "final_avg_val_ppl": {"per_seed": [finals[name][s] for s in seeds], "mean": mean([finals[name][s] for s in seeds])},
            "final_token_weighted_val_ppl": {"per_seed": [finals_tw[name][s] for s in seeds],
                                             "mean": mean([finals_tw[name][s] for s in seeds])},
            "final_domain_val_ppl": {d: mean([final_domains[name][s][d] for s in seeds])
                                     for d in final_domains[name][seeds[0]]},
        }
        if name not in STATIC_RUNS:
            for key, ref in (("steps_fraction_to_natural", "natural"), ("steps_fraction_to_best_static", best_static)):
                if ref in runs:
                    values = []
                    for s in seeds:
                        reached = steps_to_reach(curves[(name, s)], finals[ref][s])
                        values.append(None if reached is None else reached / train_iters)
                    entry[key] = _summary(values)
            # same seed = same initialisation and data seed: the paired ratio cancels most seed noise
            entry["final_avg_val_ppl_ratio_to_best_static"] = _summary(
                [finals[name][s] / finals[best_static][s] for s in seeds])
        policies[name] = entry
    online = [n for n in runs if POLICY_RUNS[n][0] != "static"]
    best_online = min(online, key=lambda n: policies[n]["final_avg_val_ppl"]["mean"]) if online else None
    return {"best_static": best_static, "best_online": best_online, "seeds": seeds, "policies": policies,
            "curves": {f"{n}/seed{s}": c for (n, s), c in curves.items()}}


# -- output -------------------------------------------------------------------------------
def plot(runs: Dict[str, Dict[int, str]], result: dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from odm_megatron.training.plot import plot_runs

    paths = []
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(13, 5))
    best = result["best_static"]
    for i, name in enumerate(runs):
        style = "-" if name not in STATIC_RUNS else "--"
        ratios = []
        for j, seed in enumerate(result["seeds"]):
            curve = result["curves"][f"{name}/seed{seed}"]
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=f"C{i}", alpha=0.8,
                    label=name if j == 0 else None, linestyle=style)
            ref = dict(result["curves"][f"{best}/seed{seed}"])
            ratios.append([(step, ppl / ref[step]) for step, ppl in curve if step in ref])
        steps = [step for step, _ in ratios[0]]
        mean = [sum(r[k][1] for r in ratios) / len(ratios) for k in range(len(steps))]
        rel.plot(steps, mean, color=f"C{i}", marker="o", label=name, linestyle=style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("average validation perplexity (unweighted over domains)")
    ax.set_title("learning efficiency on mini_pile (each line a seed)")
    ax.legend()
    ax.grid(alpha=0.3)
    rel.set_xlabel("step")
    rel.set_ylabel(f"average perplexity / {best}'s (same seed and step)")
    rel.set_title(f"relative to {best}, mean over seeds (below 1: better)")
    rel.axhline(1.0, color="grey", linewidth=0.8)
    rel.legend()
    rel.grid(alpha=0.3)
    path = os.path.join(out_dir, "learning_efficiency_avg_ppl.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    first_seed = result["seeds"][0]
    path = os.path.join(out_dir, "learning_efficiency_weights.png")
    plot_runs([runs[n][first_seed] for n in runs], path, title=f"weights and per-domain perplexity (seed {first_seed})",
              labels=list(runs))
    paths.append(path)
    return paths


def run_seconds(log_dir: str) -> float:
    """Wall-clock seconds a finished run took (recorded in its DONE marker)."""
    with open(os.path.join(log_dir, "DONE")) as f:
        return float(f.read().split()[0])


def write_markdown(result: dict, args: argparse.Namespace, command: str, wall: float, path: str,
                   runs_time: Optional[dict] = None) -> None:
    P = result["policies"]
    runs_time = runs_time or {}

    def frac(entry: Optional[dict], digits: int = 2) -> str:
        if not entry:
            return "-"
        per = ", ".join("not reached" if v is None else f"{v:.{digits}f}" for v in entry["per_seed"])
        if entry.get("mean") is None:
            return f"({per})"
        std = f" ± {entry['std']:.{digits}f}" if "std" in entry else ""
        return f"**{entry['mean']:.{digits}f}**{std} ({per})"

    lines = [
        "# Learning efficiency on mini_pile",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; wall time of this invocation {wall / 60:.1f} min"
        + (f", {runs_time['reused']} of {runs_time['runs']} runs reused from earlier invocations in the work dir"
           if runs_time.get("reused") else "")
        + (f"; the runs took {runs_time['total_s'] / 60:.0f} min in all, {runs_time['mean_s'] / 60:.1f} min each "
           f"(two at a time, one thread each)." if runs_time.get("runs") else "."),
        f"Model: megatron-core GPTModel, {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_attention_heads} heads, sequence {args.seq_length}, batch {args.micro_batch_size}, "
        f"{args.train_iters} steps, lr {args.lr} (cosine to 10%), BPE {args.vocab_size}; policy update every "
        f"{args.update_interval} steps; evaluation every {args.eval_interval} steps on {args.eval_iters} x "
        f"{args.micro_batch_size} fixed validation windows per domain. Seeds: {result['seeds']}.",
        f"Best static policy (lowest mean final average perplexity): `{result['best_static']}`; best online "
        f"policy: `{result['best_online']}`; the library's default policy: `{_default_policy()}`.",
        "",
        "| policy | final avg val ppl (mean) | / best static's, same seed | token-weighted val ppl | steps to natural's final | steps to best static's final |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in P.items():
        ratio = e.get("final_avg_val_ppl_ratio_to_best_static")
        lines.append(
            f"| {name} | {e['final_avg_val_ppl']['mean']:.2f} ({', '.join(f'{v:.1f}' for v in e['final_avg_val_ppl']['per_seed'])}) "
            f"| {frac(ratio, digits=3)} "
            f"| {e['final_token_weighted_val_ppl']['mean']:.2f} | {frac(e.get('steps_fraction_to_natural'))} "
            f"| {frac(e.get('steps_fraction_to_best_static'))} |")
    domains = list(next(iter(P.values()))["final_domain_val_ppl"])
    lines += ["", "Final per-domain validation perplexity (mean over seeds):", "",
              "| domain | " + " | ".join(P) + " |", "| --- |" + " --- |" * len(P)]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{P[n]['final_domain_val_ppl'][d]:.1f}" for n in P) + " |")
    lines += ["", "Fractions are steps / total steps of the static run (<1: the online policy got there earlier; "
              "'not reached': it never did within the run).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="mini_pile directory (train/00.jsonl.zst, val.jsonl.zst)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "learning_efficiency"),
                   help="tokenizer, shards and run logs (reused by reruns)")
    p.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks"), help="where the JSON, markdown and plots go")
    p.add_argument("--policies", nargs="+", default=DEFAULT_RUNS, choices=sorted(POLICY_RUNS),
                   help="runs to make (static ones are the baselines of the figures of merit)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--update-interval", type=int, default=1)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-sample-bytes", default="20M")
    p.add_argument("--parallel-runs", type=int, default=2)
    p.add_argument("--threads-per-run", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic corpus and model: checks the script runs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.smoke:
        args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length = 1, 32, 2, 32
        args.micro_batch_size, args.train_iters, args.eval_interval, args.eval_iters = 4, 8, 4, 1
        args.vocab_size, args.seeds, args.tokenizer_sample_bytes = 400, args.seeds[:1], "1M"
        args.policies = ["natural", "uniform", "odm-exp3", "fitted-static"]
    command = "python benchmarks/learning_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    work = os.path.abspath(os.path.join(args.output, "_smoke_work") if args.smoke else args.work_dir)
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.output, exist_ok=True)
    t0 = time.time()
    paths = prepare_data(args, work)
    with open(os.path.join(paths["train"], "manifest.json")) as f:
        manifest = json.load(f)
    total = sum(d["tokens"] for d in manifest["domains"])
    shares = {d["name"]: d["tokens"] / total for d in manifest["domains"]}
    fitted = [n for n in args.policies if POLICY_RUNS[n][1] == FITTED_PRIOR]
    if fitted and not all(s in args.policies for s in STATIC_RUNS):
        raise SystemExit(f"learning_efficiency: {fitted} need the runs {list(STATIC_RUNS)} in --policies")
    runs: Dict[str, Dict[int, str]] = {name: {} for name in args.policies}
    reused = sum(os.path.isfile(os.path.join(work, "runs", n, f"seed{s}", "DONE"))
                 for n in args.policies for s in args.seeds)
    fit = None
    for phase in ([n for n in args.policies if n not in fitted], fitted):
        if phase is fitted and fitted:
            fit = _write_fitted_mix(runs, shares, work)
        jobs = [(name, seed) for seed in args.seeds for name in phase]
        with ThreadPoolExecutor(max_workers=args.parallel_runs) as pool:
            futures = {job: pool.submit(run_one, args, paths, work, *job) for job in jobs}
            for (name, seed), fut in futures.items():
                runs[name][seed] = fut.result()
    result = analyse(runs, shares, args.train_iters)
    wall = time.time() - t0
    default_policy = _default_policy()
    out = {
        "default_policy": default_policy,
        "best_static": result["best_static"],
        "best_online_policy": result["best_online"],
        "command": command,
        "wall_time_s": wall,
        "config": {k: v for k, v in vars(args).items() if k not in ("data_dir", "work_dir", "output")},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "python": platform.python_version()},
        "policies": result["policies"],
        "curves": result["curves"],
    }
    if fit is not None:
        out["fitted_static_mix"] = fit
    seconds = [run_seconds(d) for by_seed in runs.values() for d in by_seed.values()]
    runs_time = {"runs": len(seconds), "reused": reused, "total_s": sum(seconds), "mean_s": sum(seconds) / len(seconds)}
    out["runs_time"] = runs_time
    with open(os.path.join(args.output, "learning_efficiency.json"), "w") as f:
        json.dump(out, f, indent=1)
    write_markdown(result, args, command, wall, os.path.join(args.output, "learning_efficiency.md"), runs_time)
    plot(runs, result, args.output)
    logger.info("wrote %s", os.path.join(args.output, "learning_efficiency.json"))
    return 0


def _write_fitted_mix(runs: Dict[str, Dict[int, str]], shares: Dict[str, float], work: str) -> dict:
    """Fit the static mix on the finished natural and uniform runs; write it as a --prior file.

    An existing fit in ``work`` is kept (like finished runs are): the fitted-static runs already
    made used it. Delete ``fitted_static_mix*.json`` there to fit again."""
    prior_path = os.path.join(work, "fitted_static_mix.json")
    details_path = os.path.join(work, "fitted_static_mix.fit.json")
    if os.path.isfile(prior_path) and os.path.isfile(details_path):
        with open(details_path) as f:
            fit = json.load(f)
        logger.info("reusing the fitted static mix of seeds %s (%s)", fit["seeds"], prior_path)
        return fit
    final = {}
    for name in STATIC_RUNS:
        per_seed = [read_evals(d)[-1]["domains"] for d in runs[name].values()]
        final[name] = {dom: sum(r[dom]["ppl"] for r in per_seed) / len(per_seed) for dom in per_seed[0]}
    fit = fitted_static_mix(final["natural"], final["uniform"], shares)
    fit["seeds"] = sorted(runs["uniform"])
    with open(details_path, "w") as f:
        json.dump(fit, f, indent=1)
    with open(prior_path, "w") as f:
        json.dump(fit["shares"], f, indent=1)
    logger.info("fitted static mix (predicted avg ppl %.1f vs uniform %.1f): %s", fit["predicted_avg_ppl"],
                fit["predicted_uniform_avg_ppl"], {d: round(w, 3) for d, w in fit["shares"].items()})
    return fit


def _default_policy() -> str:
    from odm_megatron.policy import DEFAULT_POLICY

    return DEFAULT_POLICY


if __name__ == "__main__":
    sys.exit(main())
