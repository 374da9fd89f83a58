"""Process group and megatron-core model-parallel setup for ``odm-megatron train``.

One process (``python -m odm_megatron train``) or many (``torchrun --nproc_per_node N``): the
backend is nccl with GPUs and gloo without, and megatron-core's ``parallel_state`` is initialised
with the requested tensor/pipeline sizes (data parallel = the rest). The feedback all-reduce of
the mixer lives in :mod:`odm_megatron.distributed`; this module only builds the groups.
"""
from __future__ import annotations

import datetime
import errno
import inspect
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_CREATED_PROCESS_GROUP = False
_CREATED_MODEL_PARALLEL = False
_SAVE_LOCK: Optional["SaveDirLock"] = None

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LauncherGoneError(RuntimeError):
    """The launcher (torchrun) died before this worker could tie its life to it."""


def die_with_launcher() -> bool:
    """Under torchrun on Linux, have the kernel SIGKILL this worker when its launcher dies.

    Without it a ``kill -9`` of torchrun leaves its workers training on, saving checkpoints into
    the ``--save`` directory a restarted job then reads. SIGKILL rather than SIGTERM: it cannot
    be caught or ignored, and checkpoint writes are atomic (a half-written one is never
    renamed into place). The parent is checked after the request, so a launcher that died just
    before it is noticed too. Returns whether the request is in force."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:  # no libc prctl: keep going, as before
        logger.warning("cannot tie this worker to its launcher (prctl: %s): killing torchrun will not stop it", e)
        return False
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        cmdline = ""
    # The launcher is gone if the parent changed since the request, or if it had already been
    # replaced by init (pid 1 that is not torchrun itself, as it can be as a container's entrypoint).
    if os.getppid() != parent or (parent == 1 and "torch" not in cmdline):
        raise LauncherGoneError(f"the launcher (pid {parent}) exited before this worker started; not training")
    if "torch" not in cmdline:  # a wrapper script between torchrun and us, or torchrun already gone
        logger.warning("this worker's parent (pid %d: %s) is not torchrun: it dies with that process, not with "
                       "torchrun", parent, cmdline[:120] or "?")
    return True


class SaveDirLock:
    """An exclusive ``fcntl.flock`` on ``<save>/.lock``, held for the whole run by rank 0.

    Two jobs writing one ``--save`` directory would interleave checkpoints and trackers; the
    second is refused with the first one's pid and host (written into the file). The kernel
    drops the lock when the holder dies, however it dies, so a stale file never blocks a
    restart."""

    NAME = ".lock"

    def __init__(self, directory: str) -> None:
        import fcntl

        self.path = os.path.join(directory, self.NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder()
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SaveDirBusyError(
                    f"--save {directory} is in use by another training job ({holder}); wait for it to finish "
                    f"or stop it, or save this run elsewhere") from None
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n")

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.loads(f.read() or "{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class SaveDirBusyError(RuntimeError):
    """Another job holds the ``--save`` directory's lock."""


def lock_save_dir(directory: str) -> None:
    """Rank 0 takes the ``--save`` lock for this process's run (released by :func:`teardown`)."""
    global _SAVE_LOCK
    if _SAVE_LOCK is not None:
        _SAVE_LOCK.release()
    _SAVE_LOCK = SaveDirLock(directory)


@dataclass
class ParallelEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def setup_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, seed: int = 1234,
                   backend: str = "auto", timeout_minutes: int = 10) -> ParallelEnv:
    """Initialise torch.distributed (always, also for one process: the mixer's collectives and
    megatron-core's parallel_state expect a group) and megatron-core's model-parallel groups, apply
    the CPU shims when there is no GPU, and seed every RNG the way megatron-core expects."""
    from odm_megatron.training.cpu_shims import apply_cpu_shims

    have_gpu = torch.cuda.is_available()
    shims = apply_cpu_shims()
    if backend == "auto":
        backend = "nccl" if have_gpu else "gloo"
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if have_gpu:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")

    global _CREATED_PROCESS_GROUP, _CREATED_MODEL_PARALLEL
    if not dist.is_initialized():
        _CREATED_PROCESS_GROUP = True
        kwargs = {}
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            # One process, not launched: an in-memory store, no TCP port to pick (a free port found
            # here could be taken by another program before the store binds it: EADDRINUSE).
            kwargs["store"] = dist.HashStore()
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # binds the communicator to this GPU eagerly (torch >= 2.3)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        _CREATED_MODEL_PARALLEL = True
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                     pipeline_model_parallel_size=pipeline_parallel_size)
    env = ParallelEnv(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
        backend=backend,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
    )
    set_seed(seed, env)
    if not have_gpu:
        # Bit-exact resume and reproducible runs: CPU kernels have deterministic variants of all
        # we use. (On GPU this would need CUBLAS_WORKSPACE_CONFIG and costs speed; not forced.)
        torch.use_deterministic_algorithms(True)
    logger.info("rank %d/%d: backend=%s device=%s TP=%d PP=%d DP=%d%s", env.rank, env.world_size, backend,
                device, env.tp_size, env.pp_size, env.dp_size, " (megatron-core CPU shims)" if shims else "")
    return env


def set_seed(seed: int, env: ParallelEnv) -> None:
    """Megatron's layout: every pipeline stage its own seed (seed + 100 * pp_rank), data-parallel
    replicas the same one, tensor-parallel regions forked by megatron-core's RNG tracker."""
    stage_seed = seed + 100 * env.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    else:
        from odm_megatron.training.cpu_shims import model_parallel_cpu_manual_seed

        model_parallel_cpu_manual_seed(stage_seed)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """Destroy the megatron-core groups and the process group that :func:`setup_parallel` created
    (and only those: a caller that brought its own process group keeps it)."""
    global _CREATED_PROCESS_GROUP, _CREATED_MODEL_PARALLEL
    if _CREATED_MODEL_PARALLEL:
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        except Exception:  # pragma: no cover - best effort at exit
            pass
        _CREATED_MODEL_PARALLEL = False
    if _CREATED_PROCESS_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED_PROCESS_GROUP = False
    global _SAVE_LOCK
    if _SAVE_LOCK is not None:
        _SAVE_LOCK.release()
        _SAVE_LOCK = None
