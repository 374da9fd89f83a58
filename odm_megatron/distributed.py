"""The one place where ranks exchange mixing statistics.

Every ``update_interval`` steps each rank contributes its per-domain statistics to one
all-reduce (a 3 x K int64 tensor) over the whole job, and every rank then runs the same policy
update on the same integers. Who contributes:

- tensor parallelism: the TP ranks of a group hold the same per-token losses (the vocab-parallel
  cross entropy is all-reduced), so only TP rank 0 contributes, or they would count K times;
- pipeline parallelism: only the last stage has losses; the other stages (the first stage's
  data loader above all) contribute zeros and receive the same totals;
- data and context parallelism: every rank holds different tokens, so all contribute.

The all-reduce spans the world group so that every stage ends up with identical weights.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _megatron_contributes() -> Optional[bool]:
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return None
    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True)


class FeedbackReducer:
    """Sums per-domain statistics over ranks so that every rank holds the same totals.

    ``contributes``: whether this rank's statistics count. None decides from megatron-core's
    parallel state (TP rank 0 of the last pipeline stage), or True when it is not initialised.
    ``group``: the process group (default: the world).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, contributes: Optional[bool] = None) -> None:
        self.group = group
        self._contributes = contributes

    @property
    def contributes(self) -> bool:
        if self._contributes is not None:
            return self._contributes
        decided = _megatron_contributes()
        return True if decided is None else decided

    def all_reduce(self, stats: torch.Tensor) -> np.ndarray:
        """Sum ``stats`` (int64) over ranks; returns the totals as a host numpy array.

        Collective: every rank of the group must call it, in the same order.
        """
        contribution = stats if self.contributes else torch.zeros_like(stats)
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return contribution.detach().cpu().numpy().astype(np.int64, copy=True)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        buffer = contribution.detach().to(device=device, dtype=torch.int64, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.cpu().numpy()


def is_writing_rank() -> bool:
    """Whether this process writes shared files (the bandit state): global rank 0, or a lone process."""
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0
