"""Optimizer, learning-rate schedule, gradient all-reduce and clipping, kept deliberately plain.

torch ``AdamW`` on fp32 weights (no weight decay on biases and norms, as Megatron), a schedule
that is a pure function of the iteration (so resuming needs only the iteration), a data-parallel
gradient all-reduce after the last micro-batch, and a global-norm clip that counts tensor-parallel
shards once and duplicated parameters once. megatron-core's distributed optimizer is what one
would switch to at scale; it is not needed for correctness here.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List

import torch
import torch.distributed as dist

from odm_megatron.training.parallel import ParallelEnv


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay: List[torch.nn.Parameter] = []
    no_decay: List[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


class LRSchedule:
    """Linear warmup from 0 to ``lr`` over ``warmup`` steps, then decay to ``min_lr`` by
    ``decay_iters`` (cosine, linear or constant), then ``min_lr``. Megatron's formulas."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int,
                 decay_iters: int, style: str = "cosine") -> None:
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(lr), float(min_lr)
        self.warmup, self.decay_iters, self.style = int(warmup), int(decay_iters), style
        self.iteration = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        """The learning rate used by the optimizer step that makes iteration ``iteration + 1``."""
        step = iteration + 1
        if self.warmup > 0 and step <= self.warmup:
            return self.max_lr * step / self.warmup
        if self.style == "constant":
            return self.max_lr
        if step >= self.decay_iters:
            return self.min_lr
        ratio = (step - self.warmup) / max(1, self.decay_iters - self.warmup)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> None:
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def current_lr(self) -> float:
        return self.lr_at(self.iteration)

    def step(self) -> None:
        """After an optimizer step: move to the next iteration's learning rate."""
        self.iteration += 1
        self._apply()

    def state_dict(self) -> Dict[str, float]:
        return {"iteration": self.iteration, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup": self.warmup, "decay_iters": self.decay_iters, "style": self.style}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.iteration = int(state["iteration"])
        self._apply()


def allreduce_data_parallel_grads(model: torch.nn.Module, env: ParallelEnv) -> None:
    """Average gradients over the data-parallel group: one flat buffer, one all-reduce."""
    if env.dp_size == 1:
        return
    from megatron.core import parallel_state as ps

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    flat.div_(env.dp_size)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def clip_grad_norm(model: torch.nn.Module, max_norm: float, env: ParallelEnv) -> float:
    """Clip to a global L2 norm over the whole model (all TP shards and PP stages); returns the
    norm before clipping. Parameters replicated across TP ranks, and the second copy of tied
    embeddings on the last pipeline stage, are counted once."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in model.parameters() if p.grad is not None]
    counted = [p for p in params
               if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)]
    device = params[0].grad.device if params else env.device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in counted:
        sq += p.grad.detach().float().pow(2).sum()
    if env.tp_size * env.pp_size > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    total = float(sq.sqrt().item())
    if max_norm > 0 and math.isfinite(total):
        coeff = max_norm / (total + 1e-6)
        if coeff < 1.0:
            for p in params:
                p.grad.detach().mul_(coeff)
    return total
