"""The training loop of ``odm-megatron train``, top to bottom.

Per step (the protocol of :mod:`odm_megatron.mixer`)::

    batches = this rank's micro-batches of global batch `step` (sampler -> mixer.global_batch)
    for each micro-batch:
        per_token_loss = GPTModel(tokens, labels)             # [b, s]
        mixer.accumulate(per_token_loss, loss_mask, dataset_id)
        backward(masked mean / num_microbatches)
    all-reduce gradients over data parallel, clip, AdamW step, LR schedule step
    record = mixer.step_end(step)                              # every rank; a policy update every N steps
    log; evaluate every --eval-interval; checkpoint every --save-interval

With pipeline parallelism the micro-batch loop is megatron-core's pipeline schedule with the same
forward and loss functions (the mixer then sees losses on the last stage only).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from odm_megatron.options import policy_hyperparameters
from odm_megatron.training import checkpoint as ckpt
from odm_megatron.training.arguments import ConfigError
from odm_megatron.training.data import PositionTaggedDataset, build_datasets, resolve_prior, resolve_sources
from odm_megatron.training.evaluate import evaluate
from odm_megatron.training.metrics import (MetricsLogger, SampleOrderLogger, console_eval_line,
                                           console_train_line)
from odm_megatron.training.model import (allreduce_tied_embedding_grads, batch_to_device, build_model,
                                         gpt_forward)
from odm_megatron.training.optim import (LRSchedule, allreduce_data_parallel_grads, build_optimizer,
                                         clip_grad_norm)
from odm_megatron.training.parallel import ParallelEnv, setup_parallel

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a finished (or exited) run hands back to the CLI and the demo."""

    iteration: int
    domain_names: List[str]
    prior: List[float]
    final_weights: List[float]
    last_eval: Optional[Dict[str, Any]] = None
    last_loss: Optional[float] = None
    wall_time_s: float = 0.0
    log_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _build_mixer(args: argparse.Namespace, names: List[str], prior: np.ndarray, train_dataset, env: ParallelEnv):
    from odm_megatron.mixer import MixerConfig, OnlineMixer

    policy_kwargs = policy_hyperparameters(args) if args.policy != "static" else {}
    config = MixerConfig(domain_names=names, seed=args.seed, global_batch_size=args.global_batch_size,
                         update_interval=args.update_interval, lag=args.odm_lag, policy=args.policy,
                         policy_kwargs=policy_kwargs)
    try:
        return OnlineMixer(config, prior=prior, num_samples_per_domain=train_dataset.num_samples_per_domain,
                           device=env.device)
    except ValueError as e:
        raise ConfigError(f"mixer: {e}") from None


def _build_loader(args: argparse.Namespace, dataset, mixer, iteration: int, env: ParallelEnv) -> DataLoader:
    from odm_megatron.sampler import OnlineMixingBatchSampler

    prefetch = 2 if args.num_workers > 0 else None
    try:
        mixer.validate_prefetch(args.num_workers, prefetch, args.num_microbatches)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sampler = OnlineMixingBatchSampler(mixer, total_samples=args.train_iters * args.global_batch_size,
                                       consumed_samples=iteration * args.global_batch_size,
                                       micro_batch_size=args.micro_batch_size,
                                       data_parallel_rank=env.dp_rank, data_parallel_size=env.dp_size)
    if args.log_sample_order:
        dataset = PositionTaggedDataset(dataset)
    # A private generator: creating a loader iterator draws a base seed, which must not come from the
    # global RNG (a resumed run creates its iterator after restoring the RNG states, the original
    # run before step 1; drawing from the global RNG would shift every later dropout mask).
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                      pin_memory=env.device.type == "cuda", prefetch_factor=prefetch,
                      generator=torch.Generator().manual_seed(args.seed))


def _masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def forward_backward(model: torch.nn.Module, batches: List[dict], mixer, args: argparse.Namespace,
                     env: ParallelEnv) -> torch.Tensor:
    """Forward and backward over this step's micro-batches; returns the mean of the micro-batch
    losses on the last stage (0 elsewhere). Gradients accumulate in ``param.grad``."""
    n = len(batches)

    def loss_func(batch: dict, per_token_loss: torch.Tensor):
        mixer.accumulate(per_token_loss, batch["loss_mask"], batch["dataset_id"])
        loss = _masked_mean(per_token_loss, batch["loss_mask"])
        return loss, {"lm loss": loss.detach()}

    if env.pp_size == 1:
        total = torch.zeros((), dtype=torch.float32, device=env.device)
        for batch in batches:
            per_token_loss = gpt_forward(model, batch, args.bf16)
            loss, _ = loss_func(batch, per_token_loss)
            (loss / n).backward()
            total += loss.detach()
        return total / n

    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator: Iterator[dict], model_chunk: torch.nn.Module):
        batch = next(data_iterator)
        return gpt_forward(model_chunk, batch, args.bf16), partial(loss_func, batch)

    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=n,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False)
    if env.is_last_stage and reduced:
        return torch.stack([r["lm loss"] for r in reduced]).mean()
    return torch.zeros((), dtype=torch.float32, device=env.device)


def _global_mean_loss(local_mean: torch.Tensor, env: ParallelEnv) -> float:
    """Mean over data-parallel ranks of the last stage's loss, known on every rank (one all-reduce)."""
    contributes = env.tp_rank == 0 and env.is_last_stage
    value = (local_mean.detach().to(torch.float64) if contributes
             else torch.zeros((), dtype=torch.float64, device=env.device)).reshape(1)
    if env.world_size > 1:
        dist.all_reduce(value)
    return float(value.item()) / env.dp_size


def quiet_logging() -> None:
    """megatron-core logs every dataset index it builds at INFO; keep the console readable, and
    let only rank 0 of a multi-process job speak below WARNING."""
    import os

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("megatron").setLevel(logging.WARNING)
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))


def run_training(args: argparse.Namespace) -> TrainSummary:
    """Train as the (validated) args say. Collective over the launched processes."""
    start_time = time.time()
    quiet_logging()
    # Manifests and prior first: they only read files, so their errors come before any process group.
    sources = resolve_sources(args)
    prior = resolve_prior(args.prior, sources.domain_names, sources.train.natural_weights)
    env = setup_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed,
                         backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes)
    if env.dp_size != args.data_parallel_size:
        raise ConfigError(f"data-parallel size is {env.dp_size}, expected {args.data_parallel_size}")

    # --- data, model, optimizer, mixer --------------------------------------------------------
    data = build_datasets(args, sources)
    names = data.domain_names
    model = build_model(args, env, data.train.vocab_size)
    optimizer = build_optimizer(args, model)
    scheduler = LRSchedule(optimizer, args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters,
                           args.lr_decay_style)
    mixer = _build_mixer(args, names, prior, data.train_dataset, env)

    # a resume from --load, or a fresh start that overwrites no earlier run's logs or checkpoints
    iteration = ckpt.resume_or_start(args, model, optimizer, scheduler, mixer, env, names)
    resumed_at = iteration
    if iteration >= args.train_iters:
        logger.info("checkpoint is at iteration %d >= --train-iters %d: nothing to train", iteration,
                    args.train_iters)

    log_rank = env.rank == 0
    metrics = MetricsLogger(args.log_dir, log_rank, names, resume_step=iteration,
                            tensorboard=not args.no_tensorboard)
    order_log = SampleOrderLogger(args.log_dir, env.rank, args.log_sample_order, resume_step=iteration)
    if iteration == 0:
        metrics.log_mixture({"step": 0, "update": 0, "effective_step": 1,
                             "weights": {n: float(w) for n, w in zip(names, mixer.weights_for_step(0))},
                             "loss": {n: None for n in names}, "tokens": {n: 0 for n in names}})
    if data.valid_datasets is None and args.eval_interval > 0 and log_rank:
        logger.warning("no validation data (--valid-manifest / --valid-data-path): evaluation is off")

    loader = _build_loader(args, data.train_dataset, mixer, iteration, env)
    data_iter = iter(loader)
    model.train()
    tokens_per_step = args.global_batch_size * args.seq_length
    last_loss: Optional[float] = None
    last_eval: Optional[Dict[str, Any]] = None
    last_saved: Optional[int] = None
    evaluated_at: Optional[int] = None
    if log_rank:
        logger.info("training for %d steps from step %d: %d domains, policy %s, global batch %d x %d tokens "
                    "(%d micro-batches x %d x DP %d)", args.train_iters, iteration, len(names),
                    args.policy, args.global_batch_size, args.seq_length, args.num_microbatches,
                    args.micro_batch_size, env.dp_size)

    def run_eval(at: int) -> None:
        nonlocal last_eval, evaluated_at
        if data.valid_datasets is None:
            return
        last_eval = evaluate(model, data.valid_datasets, data.valid.domain_names, names, args, env, at)
        evaluated_at = at
        metrics.log_eval(last_eval)
        if log_rank:
            logger.info(console_eval_line(last_eval))

    def save(at: int) -> None:
        nonlocal last_saved
        ckpt.save_checkpoint(args.save, at, model, optimizer, scheduler, mixer, args, env, names)
        last_saved = at

    # --- the loop ----------------------------------------------------------------------------
    for step in range(iteration, args.train_iters):
        t0 = time.perf_counter()
        weights = mixer.weights_for_step(step)
        batches = []
        for micro in range(args.num_microbatches):
            batch = next(data_iter)
            if args.log_sample_order:
                order_log.log(step + 1, micro, batch["dataset_id"].tolist(), batch.pop("position").tolist())
            batches.append(batch_to_device(batch, env.device))

        local_loss = forward_backward(model, batches, mixer, args, env)
        allreduce_data_parallel_grads(model, env)
        allreduce_tied_embedding_grads(model, env)
        grad_norm = clip_grad_norm(model, args.clip_grad, env)
        lr = scheduler.current_lr
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = mixer.step_end(step)
        iteration = step + 1

        last_loss = _global_mean_loss(local_loss, env)
        step_time = time.perf_counter() - t0
        metrics.log_train(iteration, last_loss, lr, grad_norm, tokens_per_step / step_time, step_time)
        if record is not None:
            line = record.to_json(names)
            line["step"] = record.step + 1
            line["effective_step"] = record.effective_step + 1
            metrics.log_mixture(line)
            order_log.log_update(line)
        if log_rank and (iteration % args.log_interval == 0 or iteration == 1 or iteration == args.train_iters):
            logger.info(console_train_line(iteration, args.train_iters, last_loss, lr, grad_norm,
                                           tokens_per_step / step_time, step_time, names, weights))
        if not math.isfinite(last_loss) and log_rank:
            logger.warning("step %d: non-finite loss %s", iteration, last_loss)

        if args.eval_interval > 0 and iteration % args.eval_interval == 0:
            run_eval(iteration)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
        if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
            if args.save and last_saved != iteration:
                save(iteration)
            if log_rank:
                logger.info("exiting at step %d (--exit-interval %d)", iteration, args.exit_interval)
            break
    else:
        if args.eval_interval > 0 and evaluated_at != iteration and iteration > 0:
            run_eval(iteration)
        if args.save and last_saved != iteration and iteration > resumed_at:
            save(iteration)

    metrics.close()
    order_log.close()
    final_weights = mixer.latest_weights
    return TrainSummary(
        iteration=iteration, domain_names=names, prior=prior.tolist(), final_weights=list(map(float, final_weights)),
        last_eval=last_eval, last_loss=last_loss, wall_time_s=time.time() - start_time, log_dir=args.log_dir,
        checkpoint=ckpt.iteration_dir(args.save, last_saved) if args.save and last_saved else None,
        extra={"rank": env.rank, "world_size": env.world_size},
    )
