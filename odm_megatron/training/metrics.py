"""What a training run reports: JSONL logs, console lines and (optionally) TensorBoard events.

``--log-dir`` holds, written by global rank 0:

- ``train.jsonl``    one line per step: step, loss, lr, grad_norm, tokens/s, step time
- ``mixture.jsonl``  one line per policy update: step, weights / loss / tokens by domain name
- ``eval.jsonl``     one line per evaluation (:func:`odm_megatron.training.evaluate.eval_record`):
                     step, per trained domain loss / perplexity / tokens, their unweighted and
                     token-weighted averages, and held-out (untrained) domains with their average
- ``tensorboard/``   the same scalars, when the ``tensorboard`` package is installed

and, with ``--log-sample-order``, from every rank: ``sample_order_rank<R>.jsonl``, one line per
micro-batch with ``[domain id, within-domain position]`` of each sample in consumption order, and
``mixture_rank<R>.jsonl``, that rank's own copy of every policy update (to audit that all ranks
agree).
Every ``step`` is a 1-based iteration number (optimizer steps completed), as in Megatron's logs.
When a run resumes, lines past the resumed iteration (from the interrupted run) are dropped so
the logs read as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

STEP_KEYED_LOGS = ("train.jsonl", "mixture.jsonl", "eval.jsonl")
PER_RANK_LOG_RE = re.compile(r"^(sample_order|mixture)_rank\d+\.jsonl$")


def _json_default(value: Any):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


def truncate_step_log(path: str, last_step: int) -> None:
    """Keep only lines whose ``step`` <= ``last_step`` (atomically: temp file + rename)."""
    if not os.path.isfile(path):
        return
    kept: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def truncate_per_rank_logs(log_dir: str, last_step: int) -> None:
    """Cut every rank's ``--log-sample-order`` logs back to ``last_step`` on a resume, those of
    ranks that no longer exist (a smaller data-parallel size) included. Call on one rank, before
    the ranks open their own logs."""
    if not os.path.isdir(log_dir):
        return
    for name in os.listdir(log_dir):
        if PER_RANK_LOG_RE.match(name):
            truncate_step_log(os.path.join(log_dir, name), last_step)


class MetricsLogger:
    """Rank-0 JSONL + TensorBoard writer; a no-op object on other ranks or without a log dir."""

    def __init__(self, log_dir: Optional[str], enabled: bool, domain_names: Sequence[str],
                 resume_step: int = 0, tensorboard: bool = True) -> None:
        self.log_dir = log_dir
        self.enabled = bool(enabled and log_dir)
        self.domain_names = list(domain_names)
        self._files: Dict[str, Any] = {}
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        for name in STEP_KEYED_LOGS:
            path = os.path.join(log_dir, name)
            if resume_step > 0:
                truncate_step_log(path, resume_step)
            elif os.path.exists(path):
                os.remove(path)  # a fresh run in an old log dir starts fresh logs
            self._files[name] = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard drops events with step >= purge_step: the resumed run rewrites from
                # resume_step + 1, and the steps up to resume_step stay as the JSONL logs keep them.
                self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step > 0 else None)
            except (ImportError, ModuleNotFoundError):
                logger.debug("tensorboard not installed: no event files")

    def _write(self, name: str, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        f = self._files[name]
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()

    def log_train(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                  step_time: float) -> None:
        record = {"step": step, "loss": _finite_or_none(loss), "lr": lr, "grad_norm": _finite_or_none(grad_norm),
                  "tokens_per_s": tokens_per_s, "step_time": step_time}
        if record["loss"] is None or record["grad_norm"] is None and grad_norm is not None:
            record["nonfinite"] = True  # JSON has no NaN: null plus this flag (the update was skipped)
        self._write("train.jsonl", record)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)
            self._tb.add_scalar("train/tokens_per_s", tokens_per_s, step)

    def log_mixture(self, record: Dict[str, Any]) -> None:
        self._write("mixture.jsonl", record)
        if self._tb is not None:
            for name, w in record["weights"].items():
                self._tb.add_scalar(f"mixture/weight/{name}", w, record["step"])

    def log_eval(self, record: Dict[str, Any]) -> None:
        """One :func:`~odm_megatron.training.evaluate.eval_record` record."""
        self._write("eval.jsonl", record)
        if self._tb is not None:
            step = record["step"]
            for name, r in {**record["domains"], **record.get("held_out", {})}.items():
                self._tb.add_scalar(f"eval/ppl/{name}", r["ppl"], step)
                self._tb.add_scalar(f"eval/loss/{name}", r["loss"], step)
            for key in ("average", "token_weighted", "held_out_average"):
                if key in record:
                    self._tb.add_scalar(f"eval/ppl/{key}", record[key]["ppl"], step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class SampleOrderLogger:
    """Per-rank audit log of consumed samples (``--log-sample-order``)."""

    def __init__(self, log_dir: Optional[str], rank: int, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = bool(enabled and log_dir)
        self._f = None
        self._updates = None
        if self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            files = []
            for name in (f"sample_order_rank{rank}.jsonl", f"mixture_rank{rank}.jsonl"):
                path = os.path.join(log_dir, name)
                if resume_step > 0:
                    truncate_step_log(path, resume_step)
                elif os.path.exists(path):
                    os.remove(path)
                files.append(open(path, "a", encoding="utf-8"))
            self._f, self._updates = files

    def log(self, step: int, micro: int, dataset_ids: Sequence[int], positions: Sequence[int]) -> None:
        if self._f is None:
            return
        samples = [[int(d), int(p)] for d, p in zip(dataset_ids, positions)]
        self._f.write(json.dumps({"step": step, "micro": micro, "samples": samples}) + "\n")
        self._f.flush()

    def log_update(self, record: Dict[str, Any]) -> None:
        """This rank's copy of a policy update (every rank must hold the same weights)."""
        if self._updates is None:
            return
        self._updates.write(json.dumps(record, default=_json_default) + "\n")
        self._updates.flush()

    def close(self) -> None:
        for f in (self._f, self._updates):
            if f is not None:
                f.close()
        self._f = self._updates = None


def format_weights(domain_names: Sequence[str], weights: Sequence[float], limit: int = 8) -> str:
    pairs = sorted(zip(domain_names, weights), key=lambda x: -x[1])
    text = " ".join(f"{n}={w:.2f}" for n, w in pairs[:limit])
    return text + (" ..." if len(pairs) > limit else "")


def console_train_line(step: int, train_iters: int, loss: float, lr: float, grad_norm: float,
                       tokens_per_s: float, step_time: float, domain_names: Sequence[str],
                       weights: Sequence[float]) -> str:
    return (f"step {step:>6d}/{train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s | {step_time * 1000:.0f} ms/step | weights {format_weights(domain_names, weights)}")


def console_eval_line(record: Dict[str, Any]) -> str:
    """One line per evaluation: trained domains' averages and perplexities, then held-out ones."""
    avg, tw = record["average"], record.get("token_weighted")
    per = " ".join(f"{n}={r['ppl']:.1f}" for n, r in record["domains"].items())
    line = f"eval @ step {record['step']}: avg loss {avg['loss']:.4f} avg ppl {avg['ppl']:.2f}"
    if tw is not None:
        line += f" (token-weighted {tw['ppl']:.2f})"
    line += f" | ppl {per}"
    if record.get("held_out"):
        held = " ".join(f"{n}={r['ppl']:.1f}" for n, r in record["held_out"].items())
        line += f" | held-out avg ppl {record['held_out_average']['ppl']:.2f}: {held}"
    return line
