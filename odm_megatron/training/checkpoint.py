"""Atomic, verified checkpoints: a crash mid-write never leaves something that loads as valid,
a corrupt file is never loaded, and loading never executes code.

Layout (Megatron-like)::

    DIR/latest_checkpointed_iteration.txt      "100"  (replaced atomically; informational)
    DIR/iter_0000100/
        model_optim_tp00_pp000.pt             model, optimizer, LR schedule (DP rank 0 of each stage)
        rng_rank00000.pt                      python/numpy/torch(/cuda) RNG + megatron's RNG tracker
        mixer.pt                              the bandit state, plain data with its own sha256 (rank 0)
        metadata.json                         iteration, args, domain names, size + sha256 of every
                                              file: written LAST

Writing: every rank writes into ``DIR/iter_0000100.tmp-<token>/``, fsyncs its files and hashes
them; rank 0 gathers the hashes, writes ``metadata.json``, fsyncs, renames the directory to
``iter_0000100`` (atomic on one file system), fsyncs ``DIR`` and only then replaces the tracker.

Everything is plain data: tensors, numbers, strings, lists, dicts (the RNG states included), so
every file loads with ``torch.load(weights_only=True)``, the only way this module reads them.

Loading takes the **newest intact** ``iter_*`` directory, whatever the tracker says (a kill between
the rename and the tracker update leaves the tracker one checkpoint behind). Intact means:
``metadata.json`` parses and has this format and version; every file it lists exists with the
recorded size; each file a rank reads has the recorded sha256 (checked before ``torch.load``) and
loads as plain data; the bandit state's own checksum holds. A checkpoint that fails is skipped with
a WARNING naming the file and why; if checkpoints exist and none is intact the run stops with one
line per checkpoint (:class:`NoUsableCheckpointError`) rather than start over. Leftover ``*.tmp-*``
directories (from a killed write) are ignored and removed by the next save.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from odm_megatron.errors import CheckpointError, ConfigError
from odm_megatron.state import BanditState, BanditStateError
from odm_megatron.training.parallel import ParallelEnv, barrier

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
MIXER_FILE = "mixer.pt"
CHECKPOINT_FORMAT = "odm-megatron-checkpoint"
CHECKPOINT_VERSION = 2  # 2: sha256 per file, plain-data RNG states (1: sizes only, pickled numpy)
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_HASH_CHUNK = 1 << 22

# Flags that must match for a resumed run to continue the same training run.
RESUME_MUST_MATCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length",
                     "max_position_embeddings", "position_embedding_type", "untie_embeddings_and_output_weights",
                     "global_batch_size", "seed", "odm_policy", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size")


class NoUsableCheckpointError(CheckpointError, ConfigError):
    """``--load`` holds checkpoints and none is intact (exit code 2, one line per checkpoint).

    A :class:`CheckpointError`; also a :class:`ConfigError`, so the CLI reports it as one."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _model_file(env: ParallelEnv) -> str:
    return f"model_optim_tp{env.tp_rank:02d}_pp{env.pp_rank:03d}.pt"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """Every RNG this process draws from, as plain data (loads with ``weights_only=True``)."""
    from odm_megatron.training.cpu_shims import rng_tracker_states

    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": int(py_version), "state": [int(x) for x in py_internal], "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "tracker": rng_tracker_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from odm_megatron.training.cpu_shims import set_rng_tracker_states

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    set_rng_tracker_states(state["tracker"])


def _broadcast_token(env: ParallelEnv) -> str:
    token = [uuid.uuid4().hex[:8] if env.rank == 0 else None]
    if env.world_size > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _all_gather(obj: Any, env: ParallelEnv) -> List[Any]:
    if env.world_size == 1:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


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

    written: List[str] = []
    if env.dp_rank == 0:
        written.append(_model_file(env))
        _torch_save_synced({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, os.path.join(tmp, written[-1]))
    written.append(_rng_file(env.rank))
    _torch_save_synced(rng_state(), os.path.join(tmp, written[-1]))
    if env.rank == 0:
        written.append(MIXER_FILE)
        _torch_save_synced(mixer_state, os.path.join(tmp, MIXER_FILE))
    # Hash what this rank wrote (from the page cache) and gather the records on every rank.
    mine = {name: {"size": os.path.getsize(os.path.join(tmp, name)), "sha256": file_sha256(os.path.join(tmp, name))}
            for name in written}
    files: Dict[str, Dict[str, Any]] = {}
    for part in _all_gather(mine, env):
        files.update(part)

    if env.rank == 0:
        metadata = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "iteration": iteration,
            "consumed_samples": iteration * args.global_batch_size, "domain_names": list(domain_names),
            "world_size": env.world_size, "tp": env.tp_size, "pp": env.pp_size, "dp": env.dp_size,
            "files": dict(sorted(files.items())), "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
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


# -- verification ---------------------------------------------------------------------------------

def list_checkpoints(root: str) -> List[int]:
    """Iterations of the ``iter_*`` directories under ``root``, newest first (intact or not)."""
    if not os.path.isdir(root):
        return []
    found = (_ITER_RE.match(name) for name in os.listdir(root))
    return sorted((int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0)))),
                  reverse=True)


def _check_structure(directory: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Metadata parses, has this format/version, and lists files present with their sizes."""
    path = os.path.join(directory, METADATA)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None, f"{METADATA} missing (a write that did not finish)"
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        return None, f"{METADATA} unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return None, f"{METADATA} is not odm-megatron checkpoint metadata"
    if meta.get("version") != CHECKPOINT_VERSION:
        return None, (f"checkpoint format version {meta.get('version')!r}; this odm-megatron reads version "
                      f"{CHECKPOINT_VERSION} (version 1 had no checksums and pickled RNG states)")
    files = meta.get("files")
    if not isinstance(files, dict) or MIXER_FILE not in files:
        return None, f"{METADATA} lists no {MIXER_FILE}"
    for name, rec in files.items():
        if (not isinstance(rec, dict) or not isinstance(rec.get("size"), int)
                or not isinstance(rec.get("sha256"), str) or os.path.basename(name) != name):
            return None, f"{METADATA}: bad entry for {name!r}"
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path):
            return None, f"{name} missing"
        size = os.path.getsize(file_path)
        if size != rec["size"]:
            return None, f"{name} has {size} bytes, {METADATA} says {rec['size']}"
    return meta, None


def _verify_files(directory: str, meta: Dict[str, Any], names: List[str]) -> Optional[str]:
    files = meta["files"]
    for name in names:
        if name not in files:
            return f"{name} not listed in {METADATA}"
        try:
            digest = file_sha256(os.path.join(directory, name))
        except OSError as e:
            return f"{name} unreadable ({e.strerror or e})"
        if digest != files[name]["sha256"]:
            return f"{name} fails its sha256 check (corrupt)"
    return None


def checkpoint_problem(directory: str, verify: Optional[List[str]] = None) -> Tuple[Optional[Dict[str, Any]],
                                                                                     Optional[str]]:
    """``(metadata, None)`` if ``directory`` is a complete checkpoint whose files ``verify``
    (default: all) have their recorded sha256; else ``(None, why)`` naming the file."""
    meta, why = _check_structure(directory)
    if why is None:
        why = _verify_files(directory, meta, list(meta["files"]) if verify is None else verify)
    return (None, why) if why else (meta, None)


def read_metadata(directory: str) -> Optional[Dict[str, Any]]:
    """The metadata of an intact checkpoint directory (every file verified), or None."""
    return checkpoint_problem(directory)[0]


def find_latest_checkpoint(root: str) -> Optional[int]:
    """The iteration of the newest intact checkpoint under ``root`` (None if there is none).

    Every file is verified (one process). Not the tracker: it lags when a job dies between the
    directory's rename and the tracker update."""
    for it in list_checkpoints(root):
        if read_metadata(iteration_dir(root, it)) is not None:
            return it
    return None


def _tracked_iteration(root: str) -> Optional[int]:
    try:
        with open(os.path.join(root, TRACKER), encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
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


@dataclass
class _Candidate:
    """One checkpoint directory as this rank read it: verified, loaded as plain data, not applied."""

    directory: str
    meta: Dict[str, Any]
    blob: Dict[str, Any]
    bandit: BanditState
    rng: Dict[str, Any]
    rng_file: str


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _read_candidate(directory: str, env: ParallelEnv) -> Tuple[Optional[_Candidate], Optional[str]]:
    """Verify the files this rank needs (sha256 before any ``torch.load``), then load them with
    ``weights_only=True``. Returns ``(candidate, None)`` or ``(None, why)``."""
    meta, why = _check_structure(directory)
    if why:
        return None, why
    rng_file = _rng_file(env.rank)
    if meta.get("world_size") != env.world_size or rng_file not in meta["files"]:
        rng_file = _rng_file(0)
    names = [_model_file(env), MIXER_FILE, rng_file]
    why = _verify_files(directory, meta, names)
    if why:
        return None, why
    loaded: Dict[str, Any] = {}
    for name in names:
        try:
            loaded[name] = torch.load(os.path.join(directory, name), weights_only=True,
                                      map_location=env.device if name == names[0] else "cpu")
        except Exception as e:  # noqa: BLE001 - any failure means: not a file this module wrote
            return None, f"{name} does not load as plain data ({_short(e)})"
    blob, rng = loaded[names[0]], loaded[rng_file]
    if not isinstance(blob, dict) or not {"model", "optimizer", "scheduler"} <= set(blob):
        return None, f"{names[0]} lacks model/optimizer/scheduler"
    if not isinstance(rng, dict) or not {"python", "numpy", "torch", "tracker"} <= set(rng):
        return None, f"{rng_file} is not an RNG state"
    try:
        bandit = BanditState.from_dict(loaded[MIXER_FILE], source=MIXER_FILE)
    except BanditStateError as e:
        return None, str(e)
    return _Candidate(directory, meta, blob, bandit, rng, rng_file), None


def select_checkpoint(root: str, env: ParallelEnv) -> Tuple[Optional["_Candidate"], List[str]]:
    """The newest checkpoint under ``root`` that every rank verified and read, and one line per
    newer checkpoint skipped (``(None, lines)`` if none is usable). Collective; nothing applied."""
    problems: List[str] = []
    for iteration in list_checkpoints(root):
        directory = iteration_dir(root, iteration)
        candidate, why = _read_candidate(directory, env)
        if why is None and candidate.meta.get("iteration") != iteration:
            candidate, why = None, f"{METADATA} is for iteration {candidate.meta.get('iteration')!r}"
        bad = [(rank, r) for rank, r in enumerate(_all_gather(why, env)) if r]
        if not bad:
            return candidate, problems
        rank, reason = bad[0]
        where = f" (rank {rank})" if env.world_size > 1 else ""
        problems.append(f"{directory}: {reason}{where}")
        if env.rank == 0:
            logger.warning("skipping checkpoint %s: %s%s", directory, reason, where)
    return None, problems


def load_checkpoint(root: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, mixer,
                    args: argparse.Namespace, env: ParallelEnv, domain_names: List[str]) -> int:
    """Restore the newest intact checkpoint under ``root``; returns its iteration (0 if there is
    no checkpoint at all). Collective: every rank checks the files it reads and all agree.

    Raises :class:`NoUsableCheckpointError` if checkpoints exist and none is intact, and
    :class:`ConfigError` if the newest intact one belongs to another configuration. RNG states come
    from this rank's own file when the world size is unchanged, else from rank 0's (the run then
    continues correctly but not bit-identically)."""
    iterations = list_checkpoints(root)
    if not iterations:
        if env.rank == 0:
            logger.warning("no checkpoint in --load %s: starting from scratch", root)
        return 0
    candidate, problems = select_checkpoint(root, env)
    if candidate is None:
        raise NoUsableCheckpointError(
            f"--load {root} holds {len(iterations)} checkpoint(s) and none can be used "
            "(nothing was overwritten; move the bad ones away or fix --load):\n  " + "\n  ".join(problems))
    directory, iteration = candidate.directory, int(candidate.meta["iteration"])
    meta = candidate.meta
    check_resume_compatible(meta, args, env, domain_names, directory)
    model.load_state_dict(candidate.blob["model"])
    optimizer.load_state_dict(candidate.blob["optimizer"])
    scheduler.load_state_dict(candidate.blob["scheduler"])
    try:
        mixer.load_bandit_state(candidate.bandit)
    except BanditStateError as e:  # a different domain list, seed, data size, policy, ...
        raise ConfigError(f"checkpoint {directory}: {e}") from None
    if candidate.rng_file != _rng_file(env.rank):
        logger.warning("world size changed since the checkpoint (%s -> %d): RNG states from rank 0",
                       meta.get("world_size"), env.world_size)
    set_rng_state(candidate.rng)
    tracked = _tracked_iteration(root)
    if env.rank == 0 and tracked is not None and tracked != iteration:
        logger.warning("%s names iteration %d; resuming from the newest intact checkpoint, %d", TRACKER,
                       tracked, iteration)
    if env.rank == 0:
        logger.info("resumed from %s (iteration %d)", directory, iteration)
    return iteration


def _last_logged_step(path: str) -> int:
    """The highest ``step`` in a JSONL log (0 if none)."""
    last = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    last = max(last, int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        return 0
    return last


def _fresh_start_problem(args: argparse.Namespace) -> Optional[str]:
    """Why a run starting at step 0 would write over an earlier run (None: it would not).

    Rank 0 only. With ``--load`` (which held no checkpoint at all: a job restarted before its first
    save) the earlier attempt's logs are moved aside, not refused."""
    from odm_megatron.training.metrics import PER_RANK_LOG_RE, STEP_KEYED_LOGS

    save = getattr(args, "save", None)
    if save and list_checkpoints(save):
        return (f"--save {save} already holds checkpoints of another run (newest "
                f"iter_{list_checkpoints(save)[0]:07d}); resume it with --load {save}, or save this run "
                "elsewhere (nothing was overwritten)")
    log_dir = getattr(args, "log_dir", None)
    if not log_dir or not os.path.isdir(log_dir):
        return None
    logged = _last_logged_step(os.path.join(log_dir, "train.jsonl"))
    if logged == 0:
        return None
    if not getattr(args, "load", None):
        return (f"--log-dir {log_dir} already holds the logs of another run (train.jsonl up to step {logged}); "
                "resume it with --load, or use a new --log-dir (nothing was overwritten)")
    suffix = time.strftime(".before-restart-%Y%m%d-%H%M%S")
    moved = []
    for name in sorted(os.listdir(log_dir)):
        if name in STEP_KEYED_LOGS or PER_RANK_LOG_RE.match(name):
            os.replace(os.path.join(log_dir, name), os.path.join(log_dir, name + suffix))
            moved.append(name)
    logger.warning("--load %s holds no checkpoint: starting from scratch; the earlier attempt's logs in %s "
                   "(train.jsonl up to step %d) were kept as *%s", args.load, log_dir, logged, suffix)
    return None


def resume_or_start(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, mixer, env: ParallelEnv, domain_names: List[str]) -> int:
    """The iteration this run starts at: a resume from ``--load`` (per-rank logs cut back to it),
    or 0 after checking that a fresh start overwrites no earlier run. Collective."""
    from odm_megatron.training.metrics import truncate_per_rank_logs

    iteration = 0
    if getattr(args, "load", None):
        iteration = load_checkpoint(args.load, model, optimizer, scheduler, mixer, args, env, domain_names)
    log_dir = getattr(args, "log_dir", None)
    if iteration > 0:
        # Ranks that no longer exist (a smaller data-parallel size) must not keep lines past the
        # resume point; the ranks that do exist cut their own logs too (idempotent).
        if env.rank == 0 and log_dir:
            truncate_per_rank_logs(log_dir, iteration)
        barrier()
        return iteration
    problem = [_fresh_start_problem(args) if env.rank == 0 else None]
    if env.world_size > 1:
        dist.broadcast_object_list(problem, src=0)  # also orders the moves before any rank's logging
    if problem[0]:
        raise ConfigError(problem[0])
    return 0
