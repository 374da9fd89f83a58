"""Per-domain validation loss and perplexity on fixed windows.

The windows of domain d are the first ``eval_iters x global_batch_size`` sequences (fewer if the
domain's validation data is smaller) of d's validation GPTDataset, which is built with a fixed
seed (:data:`odm_megatron.training.data.EVAL_DATA_SEED`). So every run and every policy, whatever
its ``--seed``, scores the same tokens, and the numbers are comparable across runs. Windows are
dealt to data-parallel ranks in micro-batches; token-level loss sums (float64) are all-reduced.

Validation data need not name the training domains: :func:`eval_record` (one function, shared by
the trainer and the Megatron-LM integration) splits the scored domains into trained ones (the
headline figures) and held-out ones (never trained on: how well the model generalises), each with
its own averages.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Dict, List, Mapping, Sequence

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


def _domain_figures(loss_sum: float, tokens: float) -> Dict[str, Any]:
    loss = float(loss_sum) / float(tokens) if tokens > 0 else float("nan")
    return {"loss": loss, "ppl": _safe_exp(loss), "tokens": int(tokens)}


def _unweighted(figures: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """Every domain counts the same, whatever its size or weight (domains with no tokens skipped)."""
    scored = [f for f in figures.values() if f["tokens"] > 0]
    if not scored:
        return {"loss": float("nan"), "ppl": float("nan")}
    return {"loss": sum(f["loss"] for f in scored) / len(scored), "ppl": sum(f["ppl"] for f in scored) / len(scored)}


def eval_record(step: int, loss_sums: Mapping[str, float], token_counts: Mapping[str, float],
                trained_domains: Sequence[str]) -> Dict[str, Any]:
    """The evaluation record written to ``eval.jsonl`` from per-domain token-loss sums and counts.

    ``loss_sums`` / ``token_counts`` hold, per validation domain name, the sum of the per-token
    losses and the number of tokens scored. Domains in ``trained_domains`` (the training mixture's
    names) are the headline: ``domains`` (in training order), their unweighted ``average`` (mean
    loss, mean perplexity: every domain counts the same) and their ``token_weighted`` average
    (all their tokens pooled; perplexity = exp of the pooled loss). Validation domains that were
    not trained on go to ``held_out`` (in the given order) with their own ``held_out_average``;
    both keys are present only when there are such domains. Trained domains without validation
    data are simply absent. Returns::

        {"step", "domains": {name: {"loss", "ppl", "tokens"}}, "average": {"loss", "ppl"},
         "token_weighted": {"loss", "ppl"}[, "held_out": {...}, "held_out_average": {"loss", "ppl"}]}
    """
    if set(loss_sums) != set(token_counts):
        raise ValueError(f"loss sums and token counts name different domains: {sorted(loss_sums)} vs "
                         f"{sorted(token_counts)}")
    trained = [n for n in trained_domains if n in loss_sums]
    held_out = [n for n in loss_sums if n not in set(trained_domains)]
    domains = {n: _domain_figures(loss_sums[n], token_counts[n]) for n in trained}
    total_tokens = sum(float(token_counts[n]) for n in trained)
    pooled = sum(float(loss_sums[n]) for n in trained) / total_tokens if total_tokens > 0 else float("nan")
    record: Dict[str, Any] = {"step": int(step), "domains": domains, "average": _unweighted(domains),
                              "token_weighted": {"loss": pooled, "ppl": _safe_exp(pooled)}}
    if held_out:
        record["held_out"] = {n: _domain_figures(loss_sums[n], token_counts[n]) for n in held_out}
        record["held_out_average"] = _unweighted(record["held_out"])
    return record


def evaluate(model: torch.nn.Module, valid_datasets: Sequence, valid_names: Sequence[str],
             trained_names: Sequence[str], args: argparse.Namespace, env: ParallelEnv, step: int) -> Dict[str, Any]:
    """Score every validation domain's fixed windows; returns :func:`eval_record`'s record.
    Collective: every rank must call it."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(valid_names), 2, dtype=torch.float64, device=env.device)  # [loss sum, tokens]
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
    sums = sums.cpu()
    return eval_record(step, {n: float(sums[d, 0]) for d, n in enumerate(valid_names)},
                       {n: float(sums[d, 1]) for d, n in enumerate(valid_names)}, trained_names)


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
