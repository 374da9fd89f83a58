"""Fault injection: SIGKILL ``odm-megatron train`` at random points, resume, and check that every
continuation is bit-identical to an uninterrupted run.

    python benchmarks/fault_injection.py --fast               # 3 kills in one trial (the test's form)
    python benchmarks/fault_injection.py --minutes 10         # random trials until the budget is spent

A trial starts a fresh run, kills it (1 to 3 times, each resume may be killed again), then resumes
it to the end with ``--load``; its ``train.jsonl``/``mixture.jsonl``/``eval.jsonl`` (timing fields
aside), final model and final bandit state must equal those of the uninterrupted reference run with
the same number of processes. Kill points:

- ``timer``: the whole process group, after a random delay (anywhere: start-up, a step, a save);
- ``training``: right after the k-th step's log line;
- ``checkpoint-write``: half-way through writing the k-th checkpoint file (a torn file);
- ``before-rename`` / ``after-rename`` / ``after-tracker``: after the k-th directory fsync of a
  save, i.e. with the complete ``iter_*.tmp-*`` directory not yet renamed; renamed but the tracker
  not yet updated; everything done.

In-process kills (all but ``timer``) hit one rank (torchrun then stops the others). The tiny model
and corpus of the test suite are used (``tests/training_fixtures.py``), on CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

logger = logging.getLogger("fault_injection")

ITERS = 12
SAVE_INTERVAL = 3
FILES_PER_SAVE = {0: 3, 1: 1}  # rank 0: model, rng, mixer; rank 1 (DP rank 1): its rng file
FSYNC_PHASES = {1: "before-rename", 2: "after-rename", 0: "after-tracker"}

LAUNCHER = r'''
import io, os, signal, sys
plan, target = os.environ.get("ODM_FI_KILL", ""), os.environ.get("ODM_FI_RANK", "0")
if plan and os.environ.get("RANK", "0") == target:
    import torch
    import odm_megatron.training.checkpoint as ckpt
    from odm_megatron.training import metrics
    phase, n = plan.split(":")
    n, count = int(n), [0]

    def due():
        count[0] += 1
        return count[0] == n

    def die():
        sys.stderr.write(f"fault injection: SIGKILL at {plan}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "step":
        real_log = metrics.MetricsLogger.log_train
        def log_train(self, *a, **k):
            real_log(self, *a, **k)
            if due():
                die()
        metrics.MetricsLogger.log_train = log_train
    elif phase == "file":
        real_save = ckpt._torch_save_synced
        def save(obj, path):
            if not due():
                return real_save(obj, path)
            buf = io.BytesIO()
            torch.save(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
            die()
        ckpt._torch_save_synced = save
    elif phase == "fsync":
        real_fsync = ckpt._fsync_dir
        def fsync_dir(path):
            real_fsync(path)
            if due():
                die()
        ckpt._fsync_dir = fsync_dir
from odm_megatron.cli import main
sys.exit(main(sys.argv[1:]))
'''


def train_argv(manifests: Dict[str, str], logs: str, save: str) -> List[str]:
    from training_fixtures import TINY_MODEL

    return ["train", "--manifest", manifests["train"], "--valid-manifest", manifests["valid"], *TINY_MODEL,
            "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--update-interval", "2",
            "--eval-interval", "4", "--log-interval", "100", "--log-dir", logs, "--no-tensorboard",
            "--save", save, "--save-interval", str(SAVE_INTERVAL)]


def launch(work: str, argv: List[str], nproc: int, kill: Optional[str] = None, kill_rank: int = 0,
           timer_s: Optional[float] = None, timeout: float = 600) -> Dict[str, Any]:
    """Run one training process (group); returns its exit code and whether an injected kill fired."""
    from training_fixtures import free_port

    launcher = os.path.join(work, "launcher.py")
    if not os.path.exists(launcher):
        with open(launcher, "w") as f:
            f.write(LAUNCHER)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", ODM_FI_KILL=kill or "", ODM_FI_RANK=str(kill_rank))
    if nproc == 1:
        cmd = [sys.executable, launcher, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), launcher, *argv]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timer_s if timer_s is not None else timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    try:  # nothing of the job may outlive it (torchrun's workers included)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    fired = timed_out if timer_s is not None else "fault injection: SIGKILL" in err
    if timer_s is None and timed_out:
        raise RuntimeError(f"run timed out after {timeout}s:\n{err[-3000:]}")
    return {"rc": proc.returncode, "fired": fired, "seconds": time.time() - t0, "stdout": out, "stderr": err}


def _strip_timing(rows: List[dict]) -> List[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time")} for r in rows]


def _read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(reference: Dict[str, str], logs: str, save: str) -> List[str]:
    """Differences between a finished run and the reference (empty: bit-identical)."""
    import torch

    from odm_megatron.training import checkpoint as ckpt

    diffs = []
    for name in ("train.jsonl", "mixture.jsonl", "eval.jsonl"):
        if _strip_timing(_read_jsonl(os.path.join(reference["logs"], name))) != \
                _strip_timing(_read_jsonl(os.path.join(logs, name))):
            diffs.append(name)
    if ckpt.find_latest_checkpoint(save) != ITERS:
        return diffs + [f"no intact checkpoint at {ITERS}"]
    for name in ("model_optim_tp00_pp000.pt", ckpt.MIXER_FILE):
        a = torch.load(os.path.join(ckpt.iteration_dir(reference["save"], ITERS), name), weights_only=True)
        b = torch.load(os.path.join(ckpt.iteration_dir(save, ITERS), name), weights_only=True)
        if name == ckpt.MIXER_FILE:
            same = a == b
        else:
            same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if torch.is_tensor(a["model"][k]))
            same = same and a["model"].keys() == b["model"].keys()
        if not same:
            diffs.append(name)
    return diffs


def plan_kill(rng: random.Random, phase: str, save: str, nproc: int, run_seconds: float) -> Dict[str, Any]:
    """A kill point that the next run will reach, given the checkpoint it resumes from."""
    from odm_megatron.training import checkpoint as ckpt

    start = ckpt.find_latest_checkpoint(save) or 0
    steps = ITERS - start
    saves = len([s for s in range(start + 1, ITERS + 1) if s % SAVE_INTERVAL == 0 or s == ITERS])
    kill_rank = rng.randrange(nproc)
    if phase == "timer":
        return {"phase": "timer", "timer_s": rng.uniform(0.3, 1.0) * run_seconds}
    if phase == "training":
        return {"phase": phase, "kill": f"step:{rng.randint(1, max(1, steps - 1))}", "kill_rank": kill_rank}
    if phase == "checkpoint-write":
        return {"phase": phase, "kill": f"file:{rng.randint(1, saves * FILES_PER_SAVE[min(kill_rank, 1)])}",
                "kill_rank": kill_rank}
    residue = {v: k for k, v in FSYNC_PHASES.items()}[phase]
    n = 3 * rng.randrange(saves) + (residue or 3)
    return {"phase": phase, "kill": f"fsync:{n}", "kill_rank": 0}


def run_trial(work: str, manifests: Dict[str, str], reference: Dict[str, Any], phases: List[str], nproc: int,
              rng: random.Random) -> Dict[str, Any]:
    trial_dir = os.path.join(work, f"trial{len(os.listdir(work)):04d}")
    logs, save = os.path.join(trial_dir, "logs"), os.path.join(trial_dir, "ckpt")
    os.makedirs(trial_dir)
    record: Dict[str, Any] = {"nproc": nproc, "kills": [], "missed": 0}
    from odm_megatron.training import checkpoint as ckpt

    argv = train_argv(manifests, logs, save)
    for i, phase in enumerate(phases):
        plan = plan_kill(rng, phase, save, nproc, reference["seconds"])
        before = ckpt.find_latest_checkpoint(save) or 0
        run = launch(work, argv + (["--load", save] if i else []), nproc, kill=plan.get("kill"),
                     kill_rank=plan.get("kill_rank", 0), timer_s=plan.get("timer_s"))
        if not run["fired"]:
            if run["rc"] != 0:
                raise RuntimeError(f"trial run failed ({run['rc']}) without a kill:\n{run['stderr'][-3000:]}")
            record["missed"] += 1  # finished before the timer
            continue
        leftovers = [n for n in os.listdir(save) if ".tmp-" in n] if os.path.isdir(save) else []
        record["kills"].append({**{k: v for k, v in plan.items() if k != "timer_s"}, "resumed_from": before,
                                "newest_intact_after": ckpt.find_latest_checkpoint(save) or 0,
                                "tmp_dirs_left": len(leftovers),
                                "tracker_lagging": _tracker(save) != (ckpt.find_latest_checkpoint(save) or None)})
    final = launch(work, argv + ["--load", save], nproc)
    if final["rc"] != 0:
        raise RuntimeError(f"final resume failed ({final['rc']}):\n{final['stderr'][-3000:]}")
    record["diffs"] = compare(reference, logs, save)
    record["identical"] = not record["diffs"]
    if record["identical"]:
        shutil.rmtree(trial_dir)  # keep the work dir small on long runs (a mismatch stays for inspection)
    else:
        record["dir"] = trial_dir
    return record


def _tracker(save: str) -> Optional[int]:
    try:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def make_reference(work: str, manifests: Dict[str, str], nproc: int) -> Dict[str, Any]:
    ref = os.path.join(work, f"reference_np{nproc}")
    logs, save = os.path.join(ref, "logs"), os.path.join(ref, "ckpt")
    run = launch(work, train_argv(manifests, logs, save), nproc)
    if run["rc"] != 0:
        raise RuntimeError(f"reference run failed:\n{run['stderr'][-3000:]}")
    return {"logs": logs, "save": save, "seconds": run["seconds"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="one trial, three kills (training, a torn "
                        "checkpoint file, between rename and tracker update), single process")
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget of the random trials")
    parser.add_argument("--max-trials", type=int, default=1000)
    parser.add_argument("--two-process-share", type=float, default=0.3,
                        help="fraction of random trials run with 2 processes (torchrun, gloo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/odm_fault_injection", help="scratch directory (emptied)")
    parser.add_argument("--out", default=None, help="write the report here (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from training_fixtures import make_train_valid

    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    t0 = time.time()
    manifests = make_train_valid(os.path.join(args.work, "corpus"))
    trials_dir = os.path.join(args.work, "trials")
    os.makedirs(trials_dir)
    rng = random.Random(args.seed)
    references: Dict[int, Dict[str, Any]] = {1: make_reference(args.work, manifests, 1)}
    logger.info("reference run (1 process): %.1fs", references[1]["seconds"])
    records = []
    if args.fast:
        records.append(run_trial(trials_dir, manifests, references[1], ["training", "checkpoint-write",
                                                                        "after-rename"], 1, rng))
    else:
        phases = ["timer", "training", "checkpoint-write", "before-rename", "after-rename", "after-tracker"]
        deadline = t0 + args.minutes * 60
        while time.time() < deadline and len(records) < args.max_trials:
            nproc = 2 if rng.random() < args.two_process_share else 1
            if nproc not in references:
                references[nproc] = make_reference(args.work, manifests, nproc)
                logger.info("reference run (%d processes): %.1fs", nproc, references[nproc]["seconds"])
            chain = [rng.choice(phases) for _ in range(rng.randint(1, 3))]
            records.append(run_trial(trials_dir, manifests, references[nproc], chain, nproc, rng))
            r = records[-1]
            logger.info("trial %d (%d proc): kills %s -> %s", len(records), nproc,
                        [k["phase"] for k in r["kills"]], "identical" if r["identical"] else f"DIFFERS {r['diffs']}")
    kills = [k for r in records for k in r["kills"]]
    phase_counts: Dict[str, int] = {}
    for k in kills:
        phase_counts[k["phase"]] = phase_counts.get(k["phase"], 0) + 1
    report = {
        "mode": "fast" if args.fast else f"{args.minutes:g} minutes", "seed": args.seed,
        "trials": len(records), "trials_two_process": sum(r["nproc"] == 2 for r in records),
        "kills": len(kills), "kill_phases": phase_counts, "missed_timer_kills": sum(r["missed"] for r in records),
        "kills_leaving_tmp_dir": sum(k["tmp_dirs_left"] > 0 for k in kills),
        "kills_leaving_tracker_behind": sum(k["tracker_lagging"] for k in kills),
        "identical": sum(r["identical"] for r in records), "mismatched": sum(not r["identical"] for r in records),
        "wall_s": round(time.time() - t0, 1), "reference_run_s": {n: round(r["seconds"], 1) for n, r in references.items()},
        "records": records,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    logger.info("%d trials, %d kills %s: %d identical, %d mismatched (%.0fs)", report["trials"], report["kills"],
                phase_counts, report["identical"], report["mismatched"], report["wall_s"])
    return 0 if report["mismatched"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
