#!/usr/bin/env python
"""Can a mixing policy be the default? Its perplexity on held-out text, paired with uniform's.

The measurement half of the protocol (``learning_efficiency_report.py`` turns its JSON into the
report and applies the decision rule). On mini_pile (10 real domains of very unequal size):

1. **Held-out slice.** Before anything is tokenized, every training document goes either to the
   training side or to a held-out slice, by a hash of its text (sha256 of the UTF-8 text, first
   8 bytes as an integer below ``--heldout-fraction`` x 2^64: held out). Identical texts land on
   the same side, so training and held-out never share a document; the tokenizer is trained on
   the training side only. Counts per domain and a digest of the held-out hashes go into the JSON.
2. **Runs.** One SentencePiece BPE tokenizer and one preprocessing for all runs; a small
   megatron-core GPT trained with ``odm-megatron train`` for every policy x hyperparameter setting
   x horizon x seed (static policies have no setting), the same ``--seed`` giving the same
   initialisation and data seed for every policy. Each horizon is its own run (the learning-rate
   schedule ends at the horizon). Every evaluation scores the validation split and the held-out
   slice side by side: the run's validation manifest lists both, the slice's domains renamed
   ``heldout-<domain>`` so that the trainer reports them as held-out domains with their own
   average (same fixed-windows rule for both).
3. **Figures.** Per run: final unweighted average and per-domain perplexity on both splits,
   validation curve, run time. Paired ratios to uniform (same seed, same horizon) and the
   decision are computed from those by ``learning_efficiency_report`` and stored beside them.

Usage::

    # the full protocol (5 seeds x 2 horizons x 2 settings: 50 runs, about 10 run-hours on CPU)
    python benchmarks/learning_efficiency.py --seeds 1 2 3 4 5 --horizons 400 1200 \\
        --settings default alt --policies uniform odm-exp3 odm-progress
    python benchmarks/learning_efficiency.py --smoke --output /tmp/le    # synthetic corpus, 3 runs, ~1 min
    python benchmarks/learning_efficiency_report.py docs/benchmarks/learning_efficiency.json
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learning_efficiency_report as report  # noqa: E402

DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "mini_pile")

# name -> (policy, prior): what `odm-megatron train --policy --prior` gets
POLICIES: Dict[str, Tuple[str, str]] = {
    "uniform": ("static", "uniform"),
    "natural": ("static", "natural"),
    "odm-exp3": ("odm-exp3", "natural"),
    "odm-progress": ("odm-progress", "natural"),
    "smoothed-mean": ("smoothed-mean", "natural"),
}
# Hyperparameter settings: extra train flags per (non-static) policy. "default" = each policy's
# own defaults (odm-exp3 alpha 0.9; odm-progress alpha 0.9, eta 0.05; smoothed-mean alpha 0.5).
SETTINGS: Dict[str, Dict[str, List[str]]] = {
    "default": {},
    "alt": {"odm-exp3": ["--odm-alpha", "0.5"], "odm-progress": ["--odm-eta", "0.1"],
            "smoothed-mean": ["--odm-alpha", "0.8"]},
}
STATIC_SETTING = "-"  # static policies have no hyperparameters: one run per horizon and seed
HELDOUT_TAG = "heldout-"  # the held-out slice's domains in the evaluation manifest

logger = logging.getLogger("learning_efficiency")


def _odm(*argv: str, log: str, threads: int = 1) -> None:
    """Run ``python -m odm_megatron ARGV`` with ``threads`` torch threads; the log keeps the output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "odm_megatron", *argv]
    with open(log, "w") as out:
        result = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"failed ({result.returncode}): {' '.join(cmd)}\n{tail}")


# -- data ---------------------------------------------------------------------------------
def _open_text(path: str):
    raw = open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def heldout_hash(text: str) -> int:
    """The document's key: the first 8 bytes of sha256(UTF-8 text), big-endian."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def carve_heldout(inputs: List[str], train_out: str, heldout_out: str, fraction: float,
                  domain_key: str = "meta.pile_set_name") -> dict:
    """Split ``inputs`` (jsonl or jsonl.zst, one document per line) into a training file and a
    held-out file (both .jsonl.zst) by :func:`heldout_hash` < ``fraction`` x 2^64.

    Lines that are not a JSON document with a text go to the training side untouched (the
    preprocessor counts and skips them there). Every domain must end up on both sides."""
    import zstandard

    threshold = int(fraction * 2**64)
    per_domain: Dict[str, Dict[str, int]] = {}
    held_hashes = hashlib.sha256()
    unparsed = 0
    with open(train_out, "wb") as ft, open(heldout_out, "wb") as fh:
        wt = zstandard.ZstdCompressor(level=3).stream_writer(ft)
        wh = zstandard.ZstdCompressor(level=3).stream_writer(fh)
        for path in inputs:
            with _open_text(path) as lines:
                for line in lines:
                    if not line.strip():
                        continue
                    line = line if line.endswith("\n") else line + "\n"
                    try:
                        doc = json.loads(line)
                        text, domain = doc["text"], doc
                        for part in domain_key.split("."):
                            domain = domain[part]
                        key = heldout_hash(text)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        unparsed += 1
                        wt.write(line.encode("utf-8"))
                        continue
                    held = key < threshold
                    (wh if held else wt).write(line.encode("utf-8"))
                    side = "heldout" if held else "train"
                    c = per_domain.setdefault(str(domain), {"train_docs": 0, "heldout_docs": 0,
                                                            "train_chars": 0, "heldout_chars": 0})
                    c[f"{side}_docs"] += 1
                    c[f"{side}_chars"] += len(text)
                    if held:
                        held_hashes.update(key.to_bytes(8, "big"))
        wt.flush(zstandard.FLUSH_FRAME)
        wh.flush(zstandard.FLUSH_FRAME)
    empty = sorted(d for d, c in per_domain.items() if c["heldout_docs"] == 0 or c["train_docs"] == 0)
    if empty:
        raise SystemExit(f"learning_efficiency: with --heldout-fraction {fraction} the domains {empty} have no "
                         "document on one side; choose another fraction")
    return {
        "method": "sha256 of each document's UTF-8 text; its first 8 bytes as a big-endian integer; held out "
                  "iff below fraction x 2^64 (identical texts go to the same side)",
        "fraction": fraction, "domain_key": domain_key, "inputs": [os.path.basename(p) for p in inputs],
        "unparsed_lines_left_in_training": unparsed, "per_domain": dict(sorted(per_domain.items())),
        "heldout_hashes_sha256": held_hashes.hexdigest(),
    }


def prepare_data(args: argparse.Namespace, work: str) -> Tuple[Dict[str, str], dict]:
    """Held-out carve, tokenizer and the three preprocessed splits, made once per work dir."""
    paths = {"tokenizer": os.path.join(work, "tokenizer"),
             **{split: os.path.join(work, "data", split) for split in ("train", "valid", "heldout")}}
    if args.smoke:
        inputs = _smoke_corpus(work)
    else:
        inputs = {"train": [os.path.join(args.data_dir, "train", "00.jsonl.zst")],
                  "valid": [os.path.join(args.data_dir, "val.jsonl.zst")]}
        for f in inputs["train"] + inputs["valid"]:
            if not os.path.isfile(f):
                raise SystemExit(f"learning_efficiency: input not found: {f} (set --data-dir)")
    carve_path = os.path.join(work, "heldout_split.json")
    jsonl = {"train": os.path.join(work, "train_kept.jsonl.zst"), "heldout": os.path.join(work, "heldout.jsonl.zst")}
    if os.path.isfile(carve_path):
        with open(carve_path) as f:
            carve = json.load(f)
        if carve["fraction"] != args.heldout_fraction:
            raise SystemExit(f"learning_efficiency: {work} holds a held-out slice of fraction {carve['fraction']}; "
                             "use another --work-dir or the same --heldout-fraction")
    else:
        logger.info("carving the held-out slice (fraction %s)", args.heldout_fraction)
        carve = carve_heldout(inputs["train"], jsonl["train"], jsonl["heldout"], args.heldout_fraction)
        with open(carve_path, "w") as f:
            json.dump(carve, f, indent=1)
    if not os.path.isfile(paths["tokenizer"] + ".model"):
        logger.info("training the tokenizer (%d-piece BPE) on the training side", args.vocab_size)
        _odm("train-tokenizer", "--input", jsonl["train"], "--vocab-size", str(args.vocab_size),
             "--model-type", "bpe", "--output", paths["tokenizer"], "--sample-bytes", args.tokenizer_sample_bytes,
             log=os.path.join(work, "tokenizer.log"), threads=2)
    sources = {"train": [jsonl["train"]], "valid": inputs["valid"], "heldout": [jsonl["heldout"]]}
    for split, files in sources.items():
        if not os.path.isfile(os.path.join(paths[split], "manifest.json")):
            logger.info("preprocessing the %s split", split)
            _odm("preprocess", "--input", *files, "--tokenizer-model", paths["tokenizer"] + ".model",
                 "--output-dir", paths[split], "--workers", "2", "--append-eod", "--overwrite",
                 log=os.path.join(work, f"preprocess_{split}.log"), threads=1)
    paths["eval"] = write_eval_manifest(paths["valid"], paths["heldout"], os.path.join(work, "data", "eval"))
    return paths, carve


def write_eval_manifest(valid_dir: str, heldout_dir: str, out_dir: str) -> str:
    """One validation manifest holding the validation split's domains as they are and the
    held-out slice's as ``heldout-<domain>`` (never trained on, so the trainer evaluates them as
    held-out domains). Shards are referenced where they are, with their shard records."""
    with open(os.path.join(valid_dir, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(heldout_dir, "manifest.json")) as f:
        heldout = json.load(f)
    if heldout["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]:
        raise SystemExit("learning_efficiency: the validation split and the held-out slice used different tokenizers")
    os.makedirs(out_dir, exist_ok=True)
    domains = []
    for source, tag in ((manifest, ""), (heldout, HELDOUT_TAG)):
        src_dir = valid_dir if source is manifest else heldout_dir
        for d in source["domains"]:
            prefix = os.path.relpath(os.path.join(src_dir, d["prefix"]), out_dir)
            domains.append({**d, "name": tag + d["name"], "prefix": prefix})
    manifest = {**manifest, "domains": domains, "inputs": manifest.get("inputs", []) + heldout.get("inputs", [])}
    path = os.path.join(out_dir, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return path


def _smoke_corpus(work: str) -> Dict[str, List[str]]:
    from odm_megatron.preprocess.fixtures import jsonl_bytes, make_documents

    files = {}
    for split, seed, n in (("train", 0, 60), ("valid", 1, 12)):
        path = os.path.join(work, f"smoke_{split}.jsonl")
        docs = make_documents({"Pile-CC": 2 * n, "Github": n, "DM Mathematics": n // 2}, words_per_doc=120, seed=seed)
        with open(path, "wb") as f:
            f.write(jsonl_bytes(docs))
        files[split] = [path]
    return files


# -- runs ---------------------------------------------------------------------------------
def train_flags(args: argparse.Namespace, horizon: int) -> List[str]:
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size),
        "--train-iters", str(horizon), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-warmup-iters", str(max(1, horizon // 12)), "--weight-decay", "0.1",
        "--update-interval", str(args.update_interval), "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters), "--no-tensorboard", "--log-interval", str(args.eval_interval),
    ]


def run_jobs(args: argparse.Namespace) -> List[Tuple[str, str, int, int]]:
    """(name, setting, horizon, seed) of every run; static policies once per horizon and seed."""
    jobs = []
    for horizon in args.horizons:
        for seed in args.seeds:
            for name in args.policies:
                settings = [STATIC_SETTING] if POLICIES[name][0] == "static" else args.settings
                jobs += [(name, setting, horizon, seed) for setting in settings]
    return jobs


def run_dir(work: str, name: str, setting: str, horizon: int, seed: int) -> str:
    return os.path.join(work, "runs", name, "static" if setting == STATIC_SETTING else setting,
                        f"h{horizon}", f"seed{seed}")


def run_one(args: argparse.Namespace, paths: Dict[str, str], work: str, name: str, setting: str,
            horizon: int, seed: int) -> str:
    """Train one run (evaluated on both splits); reuse a finished one made with the same flags."""
    log_dir = run_dir(work, name, setting, horizon, seed)
    done = os.path.join(log_dir, "DONE")
    policy, prior = POLICIES[name]
    extra = SETTINGS[setting].get(name, []) if setting != STATIC_SETTING else []
    flags = ["--policy", policy, "--prior", prior, "--seed", str(seed), *train_flags(args, horizon), *extra]
    config = {"name": name, "setting": setting, "flags": flags}
    config_path = os.path.join(log_dir, "run_config.json")
    if os.path.isfile(done):
        with open(config_path) as f:
            made_with = json.load(f)
        if made_with != config:
            raise SystemExit(f"learning_efficiency: {log_dir} was made with other settings ({made_with['flags']}); "
                             "use another --work-dir or delete it")
        return log_dir
    os.makedirs(log_dir, exist_ok=True)
    for stale in ("eval.jsonl", "train.jsonl", "mixture.jsonl"):
        if os.path.exists(os.path.join(log_dir, stale)):
            os.unlink(os.path.join(log_dir, stale))
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    t0 = time.time()
    _odm("train", "--manifest", os.path.join(paths["train"], "manifest.json"), "--valid-manifest", paths["eval"],
         "--data-cache-path", os.path.join(work, "cache"), "--log-dir", log_dir, *flags,
         log=os.path.join(log_dir, "console.log"), threads=args.threads_per_run)
    with open(done, "w") as f:
        f.write(f"{time.time() - t0:.1f}\n")
    logger.info("finished %s [%s] h%d seed %d in %.0fs", name, setting, horizon, seed, time.time() - t0)
    return log_dir


def read_evals(path: str) -> List[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def split_figures(row: dict) -> Dict[str, dict]:
    """One evaluation record as the two splits' figures: the validation split is the trained
    domains' headline average, the held-out slice the ``heldout-`` domains' own average."""
    held = {d[len(HELDOUT_TAG):]: r["ppl"] for d, r in row.get("held_out", {}).items() if d.startswith(HELDOUT_TAG)}
    if not held or len(held) != len(row.get("held_out", {})):
        raise SystemExit(f"learning_efficiency: evaluation at step {row['step']} has held-out domains "
                         f"{sorted(row.get('held_out', {}))}, expected the {HELDOUT_TAG}* slice only")
    return {"valid": {"avg_ppl": row["average"]["ppl"], "domains_ppl": {d: r["ppl"] for d, r in row["domains"].items()}},
            "heldout": {"avg_ppl": row["held_out_average"]["ppl"], "domains_ppl": held}}


def run_figures(log_dir: str, name: str, setting: str, horizon: int, seed: int) -> dict:
    """The figures of one finished run, read from its eval log (the final row must be at the horizon)."""
    rows = read_evals(os.path.join(log_dir, "eval.jsonl"))
    if not rows or rows[-1]["step"] != horizon:
        raise SystemExit(f"learning_efficiency: {log_dir}: no evaluation at step {horizon}")
    with open(os.path.join(log_dir, "DONE")) as f:
        seconds = float(f.read().split()[0])
    curves = [(r["step"], split_figures(r)) for r in rows]
    return {"policy": name, "setting": setting, "horizon": horizon, "seed": seed, **curves[-1][1],
            "curves": {split: [[step, fig[split]["avg_ppl"]] for step, fig in curves] for split in ("valid", "heldout")},
            "seconds": seconds}


# -- main ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="mini_pile directory (train/00.jsonl.zst, val.jsonl.zst)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "learning_efficiency_protocol"),
                   help="held-out slice, tokenizer, shards and run logs (reused by reruns)")
    p.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks"), help="where the JSON and markdown go")
    p.add_argument("--name", default="learning_efficiency", help="file name stem of the JSON and markdown")
    p.add_argument("--policies", nargs="+", default=["uniform", "odm-exp3", "odm-progress"], choices=sorted(POLICIES),
                   help=f"runs to make; {report.BASELINE} is the baseline of every ratio and is always run")
    p.add_argument("--settings", nargs="+", default=["default", "alt"], choices=sorted(SETTINGS),
                   help="hyperparameter settings of the online policies: "
                        + "; ".join(f"{s}: {v or 'policy defaults'}" for s, v in SETTINGS.items()))
    p.add_argument("--horizons", nargs="+", type=int, default=[400, 1200], help="training steps (one run each)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="share of training documents held out")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--update-interval", type=int, default=1)
    p.add_argument("--eval-interval", type=int, default=100, help="must divide every horizon")
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-sample-bytes", default="20M")
    p.add_argument("--parallel-runs", type=int, default=2)
    p.add_argument("--threads-per-run", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="tiny synthetic corpus and model, 1 seed, 1 horizon: checks the script runs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.smoke:
        args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length = 1, 32, 2, 32
        args.micro_batch_size, args.horizons, args.eval_interval, args.eval_iters = 4, [6], 3, 1
        args.vocab_size, args.seeds, args.tokenizer_sample_bytes = 400, args.seeds[:1], "1M"
        args.policies, args.heldout_fraction = ["uniform", "odm-exp3"], 0.25
    if report.BASELINE not in args.policies:
        args.policies = [report.BASELINE, *args.policies]
    bad = [h for h in args.horizons if h % args.eval_interval]
    if bad:
        raise SystemExit(f"learning_efficiency: --eval-interval {args.eval_interval} does not divide the horizons {bad}")
    command = "python benchmarks/learning_efficiency.py " + " ".join(argv)
    work = os.path.abspath(os.path.join(args.output, "_smoke_work") if args.smoke else args.work_dir)
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.output, exist_ok=True)
    load_start, t0 = _loadavg(), time.time()
    paths, carve = prepare_data(args, work)
    jobs = run_jobs(args)
    reused = sum(os.path.isfile(os.path.join(run_dir(work, *job), "DONE")) for job in jobs)
    with ThreadPoolExecutor(max_workers=args.parallel_runs) as pool:
        futures = [pool.submit(run_one, args, paths, work, *job) for job in jobs]
        log_dirs = [f.result() for f in futures]
    runs = [run_figures(d, *job) for d, job in zip(log_dirs, jobs)]
    from odm_megatron.policy import DEFAULT_POLICY

    figures = {
        "benchmark": "learning efficiency: held-out perplexity paired with uniform's",
        "mode": "smoke" if args.smoke else "measured",
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "load_average": {"start": load_start, "end": _loadavg()},
        "wall_time_s": time.time() - t0,
        "runs_reused": reused,
        "library_default_policy": DEFAULT_POLICY,
        "config": {k: v for k, v in vars(args).items() if k not in ("data_dir", "work_dir", "output", "name")},
        "settings_flags": {s: SETTINGS[s] for s in args.settings},
        "heldout_split": carve,
        "runs": runs,
    }
    figures.update(report.analyse(figures))
    json_path = os.path.join(args.output, f"{args.name}.json")
    with open(json_path, "w") as f:
        json.dump(figures, f, indent=1)
    with open(os.path.join(args.output, f"{args.name}.md"), "w") as f:
        f.write(report.render(figures))
    logger.info("wrote %s and %s.md", json_path, args.name)
    return 0


def _loadavg() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


if __name__ == "__main__":
    sys.exit(main())
