"""Per-domain validation loss and perplexity on fixed windows.

The windows of domain d are the first ``eval_iters x global_batch_size`` sequences (fewer if the
domain's validation data is smaller) of d's validation GPTDataset, which is built with a fixed
seed (:data:`odm_megatron.training.data.EVAL_DATA_SEED`). So every run and every policy, whatever
its ``--seed``, scores the same tokens, and the numbers are comparable across runs. Windows are
dealt to data-parallel ranks in micro-batches; token-level loss sums (float64) are all-reduced.

Reported per domain: mean token loss and its exponential (perplexity); plus the unweighted
average over domains of both (every domain counts the same, whatever its size or weight).
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from odm_megatron.training.model import batch_to_device, gpt_forward
from odm_megatron.training.parallel import ParallelEnv

logger = logging.getLogger(__name__)


def eval_windows(num_available: int, eval_iters: int, global_batch_size: int) -> int:
    """How many leading windows of a domain's validation data are scored."""
    return min(num_available, eval_iters * global_batch_size)


def _rank_chunks(num_windows: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> List[List[int]]:
    """This DP rank's micro-batches of window indices (chunks of ``micro_batch_size``, dealt round-robin)."""
    chunks = [list(range(i, min(i + micro_batch_size, num_windows))) for i in range(0, num_windows, micro_batch_size)]
    return chunks[dp_rank::dp_size]


@torch.no_grad()
def _forward_losses(model: torch.nn.Module, batch: dict, env: ParallelEnv, bf16: bool):
    """Per-token losses of one micro-batch on the last stage (None on other stages)."""
    if env.pp_size == 1:
        return gpt_forward(model, batch, bf16)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = {}

    def forward_step(data_iterator, model_chunk):
        b = next(data_iterator)
        output = gpt_forward(model_chunk, b, bf16)

        def loss_func(out):
            captured["loss"] = out.detach()
            return out.sum() * 0.0, {}

        return output, loss_func

    tokens = batch["tokens"]
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                forward_only=True)
    return captured.get("loss")


def evaluate(model: torch.nn.Module, valid_datasets: Sequence, domain_names: Sequence[str],
             args: argparse.Namespace, env: ParallelEnv) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """Score every domain's fixed windows. Collective: every rank must call it."""
    was_training = model.training
    model.eval()
    k = len(domain_names)
    sums = torch.zeros(k, 2, dtype=torch.float64, device=env.device)  # [loss sum, tokens]
    contributes = env.tp_rank == 0 and env.is_last_stage
    for d, dataset in enumerate(valid_datasets):
        n = eval_windows(len(dataset), args.eval_iters, args.global_batch_size)
        for chunk in _rank_chunks(n, args.micro_batch_size, env.dp_rank, env.dp_size):
            batch = batch_to_device(default_collate([dataset[i] for i in chunk]), env.device)
            losses = _forward_losses(model, batch, env, args.bf16)
            if losses is not None and contributes:
                mask = batch["loss_mask"].to(torch.float64)
                sums[d, 0] += (losses.to(torch.float64) * mask).sum()
                sums[d, 1] += mask.sum()
    if env.world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    results: Dict[str, Dict[str, float]] = {}
    for d, name in enumerate(domain_names):
        total, tokens = float(sums[d, 0]), float(sums[d, 1])
        loss = total / tokens if tokens > 0 else float("nan")
        results[name] = {"loss": loss, "ppl": _safe_exp(loss), "tokens": int(tokens)}
    losses = [r["loss"] for r in results.values()]
    average = {"loss": sum(losses) / k, "ppl": sum(r["ppl"] for r in results.values()) / k}
    return results, average


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
