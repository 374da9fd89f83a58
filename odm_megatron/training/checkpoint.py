"""Atomic checkpoints: a crash mid-write never leaves something that loads as valid.

Layout (Megatron-like)::

    DIR/latest_checkpointed_iteration.txt      "100"  (replaced atomically)
    DIR/iter_0000100/
        model_optim_tp00_pp000.pt             model, optimizer, LR schedule (DP rank 0 of each stage)
        rng_rank00000.pt                      python/numpy/torch(/cuda) RNG + megatron's RNG tracker
        mixer.pt                              the bandit state (identical on all ranks; rank 0)
        metadata.json                         iteration, args, domain names, file sizes: written LAST

Writing: every rank writes into ``DIR/iter_0000100.tmp-<token>/`` and fsyncs its files; after a
barrier rank 0 writes ``metadata.json`` (with every file's size), fsyncs, renames the directory to
``iter_0000100`` (an atomic rename on one file system), fsyncs ``DIR`` and only then replaces the
tracker file. Loading trusts a directory only if ``metadata.json`` exists, parses and lists files
that exist with the recorded sizes; otherwise it falls back to the newest complete one. Leftover
``*.tmp-*`` directories (from a killed write) are ignored and removed by the next save.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from odm_megatron.training.arguments import ConfigError
from odm_megatron.training.parallel import ParallelEnv, barrier

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
CHECKPOINT_FORMAT = "odm-megatron-checkpoint"
CHECKPOINT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")

# Flags that must match for a resumed run to continue the same training run.
RESUME_MUST_MATCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length",
                     "max_position_embeddings", "position_embedding_type", "untie_embeddings_and_output_weights",
                     "global_batch_size", "seed", "policy", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _model_file(env: ParallelEnv) -> str:
    return f"model_optim_tp{env.tp_rank:02d}_pp{env.pp_rank:03d}.pt"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save_synced(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> Dict[str, Any]:
    from odm_megatron.training.cpu_shims import rng_tracker_states

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": rng_tracker_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from odm_megatron.training.cpu_shims import set_rng_tracker_states

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    set_rng_tracker_states(state["tracker"])


def _broadcast_token(env: ParallelEnv) -> str:
    token = [uuid.uuid4().hex[:8] if env.rank == 0 else None]
    if env.world_size > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def save_checkpoint(root: str, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, mixer, args: argparse.Namespace, env: ParallelEnv,
                    domain_names: List[str]) -> str:
    """Write the checkpoint of ``iteration`` atomically. Collective: call on every rank."""
    t0 = time.time()
    mixer_state = mixer.state_dict()  # collective: sums the unfinished loss window over ranks
    token = _broadcast_token(env)
    final = iteration_dir(root, iteration)
    tmp = f"{final}.tmp-{token}"
    if env.rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of killed writes
            if ".tmp-" in name and name.startswith("iter_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()

    if env.dp_rank == 0:
        _torch_save_synced({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, os.path.join(tmp, _model_file(env)))
    _torch_save_synced(rng_state(), os.path.join(tmp, _rng_file(env.rank)))
    if env.rank == 0:
        _torch_save_synced(mixer_state, os.path.join(tmp, "mixer.pt"))
    barrier()

    if env.rank == 0:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        metadata = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "iteration": iteration,
            "consumed_samples": iteration * args.global_batch_size, "domain_names": list(domain_names),
            "world_size": env.world_size, "tp": env.tp_size, "pp": env.pp_size, "dp": env.dp_size,
            "files": files, "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
        }
        meta_path = os.path.join(tmp, METADATA)
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): replace it
            old = f"{final}.tmp-old-{token}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        tracker_tmp = os.path.join(root, f".{TRACKER}.tmp-{token}")
        with open(tracker_tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        _fsync_dir(root)
        logger.info("saved checkpoint %s (%.1fs)", final, time.time() - t0)
    barrier()
    return final


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def read_metadata(directory: str) -> Optional[Dict[str, Any]]:
    """The metadata of a complete checkpoint directory, or None if it is incomplete/corrupt."""
    path = os.path.join(directory, METADATA)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return None
    for name, size in meta.get("files", {}).items():
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path) or os.path.getsize(file_path) != size:
            return None
    return meta


def find_latest_checkpoint(root: str) -> Optional[int]:
    """The iteration of the newest complete checkpoint under ``root`` (None if there is none).

    The tracker file names it normally; if it is missing, unreadable or points at an incomplete
    directory, the directories themselves are scanned."""
    if not os.path.isdir(root):
        return None
    try:
        with open(os.path.join(root, TRACKER), encoding="utf-8") as f:
            tracked = int(f.read().strip())
        if read_metadata(iteration_dir(root, tracked)) is not None:
            return tracked
        logger.warning("%s names iteration %d but that checkpoint is incomplete; scanning", TRACKER, tracked)
    except (OSError, ValueError):
        pass
    iterations = sorted((int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(root)) if m), reverse=True)
    for it in iterations:
        if read_metadata(iteration_dir(root, it)) is not None:
            return it
    return None


def check_resume_compatible(meta: Dict[str, Any], args: argparse.Namespace, env: ParallelEnv,
                            domain_names: List[str], directory: str) -> None:
    """Raise :class:`ConfigError` if the checkpoint belongs to another configuration."""
    if list(meta.get("domain_names", [])) != list(domain_names):
        saved = meta.get("domain_names", [])
        raise ConfigError(
            f"checkpoint {directory} was trained on domains {saved}, this run has {list(domain_names)}: "
            "resume with the same data (or start a new run without --load)"
        )
    saved_args = meta.get("args", {})
    diffs = [f"--{k.replace('_', '-')} {saved_args[k]} -> {getattr(args, k)}" for k in RESUME_MUST_MATCH
             if k in saved_args and saved_args[k] != getattr(args, k, None)]
    if diffs:
        raise ConfigError(f"checkpoint {directory} was made with other settings: {'; '.join(diffs)}")
    if (meta.get("tp"), meta.get("pp")) != (env.tp_size, env.pp_size):
        raise ConfigError(f"checkpoint {directory} has TP={meta.get('tp')} PP={meta.get('pp')}, "
                          f"this run TP={env.tp_size} PP={env.pp_size}")


def load_checkpoint(root: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, mixer,
                    args: argparse.Namespace, env: ParallelEnv, domain_names: List[str]) -> int:
    """Restore the newest complete checkpoint under ``root``; returns its iteration (0 if none).

    RNG states come from this rank's own file when the world size is unchanged, else from rank 0's
    (the run then continues correctly but not bit-identically)."""
    iteration = find_latest_checkpoint(root)
    if iteration is None:
        logger.info("no checkpoint in %s: starting from scratch", root)
        return 0
    directory = iteration_dir(root, iteration)
    meta = read_metadata(directory)
    check_resume_compatible(meta, args, env, domain_names, directory)

    blob = torch.load(os.path.join(directory, _model_file(env)), map_location=env.device, weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    try:
        mixer.load_state_dict(torch.load(os.path.join(directory, "mixer.pt"), weights_only=False))
    except ValueError as e:  # BanditStateError: a different domain list, seed, data size, ...
        raise ConfigError(f"checkpoint {directory}: {e}") from None
    rng_path = os.path.join(directory, _rng_file(env.rank))
    if meta.get("world_size") != env.world_size or not os.path.isfile(rng_path):
        logger.warning("world size changed since the checkpoint (%s -> %d): RNG states from rank 0",
                       meta.get("world_size"), env.world_size)
        rng_path = os.path.join(directory, _rng_file(0))
    set_rng_state(torch.load(rng_path, weights_only=False))
    logger.info("resumed from %s (iteration %d)", directory, iteration)
    return iteration
