"""The training loop of ``odm-megatron train``, top to bottom.

Per step (the protocol of :mod:`odm_megatron.mixer`)::

    batches = this rank's micro-batches of global batch `step` (sampler -> mixer.draw_global_batch)
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

from odm_megatron.training import checkpoint as ckpt
from odm_megatron.training.arguments import ConfigError
from odm_megatron.training.data import PositionTaggedDataset, build_datasets, resolve_sources
from odm_megatron.training.evaluate import evaluate
from odm_megatron.training.metrics import (MetricsLogger, SampleOrderLogger, console_eval_line,
                                           console_train_line)
from odm_megatron.training.model import (allreduce_tied_embedding_grads, batch_to_device, build_model,
                                         gpt_forward)
from odm_megatron.training.optim import (LRSchedule, allreduce_data_parallel_grads, build_optimizer,
                                         clip_grad_norm)
from odm_megatron.training.parallel import ParallelEnv, SaveDirBusyError, lock_save_dir, setup_parallel

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
    from odm_megatron.mixer import OnlineMixer

    config = args.odm_config.mixer_config(names, args.seed, args.global_batch_size)  # set by validate_args
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


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many consecutive non-finite steps, or parameters that are not finite
    where a checkpoint was due (never saved). One line for the user."""


def _mark_nonfinite(flags: torch.Tensor, per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                    dataset_id: torch.Tensor) -> None:
    """``flags[d] += 1`` for every sample of domain ``d`` with a non-finite counted loss (no host sync)."""
    bad = (~torch.isfinite(per_token_loss.detach()) & (loss_mask > 0)).any(dim=1)
    flags.index_add_(0, dataset_id.to(device=flags.device, dtype=torch.int64), bad.to(flags.dtype))


def forward_backward(model: torch.nn.Module, batches: List[dict], mixer, args: argparse.Namespace,
                     env: ParallelEnv, nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward and backward over this step's micro-batches; returns the mean of the micro-batch
    losses on the last stage (0 elsewhere). Gradients accumulate in ``param.grad``. ``nonfinite``
    (one counter per domain), when given, counts the samples whose loss was not finite."""
    n = len(batches)

    def loss_func(batch: dict, per_token_loss: torch.Tensor):
        mixer.accumulate(per_token_loss, batch["loss_mask"], batch["dataset_id"])
        if nonfinite is not None:
            _mark_nonfinite(nonfinite, per_token_loss, batch["loss_mask"], batch["dataset_id"])
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


def _check_token_ids(batch: dict, vocab_size: int, names: List[str]) -> None:
    """Ids beyond the vocabulary would crash deep in the embedding (``IndexError``); shards with a
    manifest record are refused at start-up, this catches the rest (``--data-path``, old manifests)."""
    for key in ("tokens", "labels"):
        values = batch.get(key)
        if values is None or values.numel() == 0:
            continue
        top = int(values.max())
        if top >= vocab_size:
            row = int(torch.nonzero(values >= vocab_size)[0, 0])
            domain = names[int(batch["dataset_id"][row])]
            raise ConfigError(f"domain {domain!r}: its data holds token id {top}, beyond the vocabulary of "
                              f"{vocab_size} ids (--vocab-size, or the manifest's tokenizer): the shards were made "
                              f"with another tokenizer")


def _nonfinite_domains(flags: torch.Tensor, names: List[str], env: ParallelEnv) -> List[str]:
    """Names of the domains with a non-finite loss this step on any rank (collective)."""
    if env.world_size > 1:
        dist.all_reduce(flags)
    return [names[i] for i in torch.nonzero(flags).flatten().tolist()]


def _parameters_finite(model: torch.nn.Module, env: ParallelEnv) -> bool:
    """Whether every parameter on every rank is finite (collective)."""
    ok = all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters())
    flag = torch.tensor([0.0 if ok else 1.0], device=env.device)
    if env.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _write_problem(directory: str, size: int = 1 << 20) -> Optional[OSError]:
    """The OSError that writing ``size`` bytes into ``directory`` gives now, or None."""
    import os

    from odm_megatron.output_errors import is_write_error

    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e if is_write_error(e) else None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return None


def prepare_output_dirs(args: argparse.Namespace) -> None:
    """Create ``--save`` and ``--log-dir``, prove they take a file, and (rank 0) lock ``--save``
    for this run, before any process group or model exists."""
    import os

    from odm_megatron.output_errors import describe_write_error

    for flag, directory in (("--save", getattr(args, "save", None)), ("--log-dir", getattr(args, "log_dir", None))):
        if not directory:
            continue
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"x")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(describe_write_error(e, directory, flag)) from None
    if getattr(args, "save", None) and os.environ.get("RANK", "0") == "0":
        try:
            lock_save_dir(args.save)
        except SaveDirBusyError as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(describe_write_error(e, args.save, "--save")) from None


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
    prior = args.odm_config.resolve_prior(sources.domain_names, sources.train.natural_weights)
    prepare_output_dirs(args)  # unwritable --save/--log-dir: one line now, not a traceback later
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
                    args.odm_policy, args.global_batch_size, args.seq_length, args.num_microbatches,
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

    nonfinite_streak = 0  # consecutive steps with a non-finite loss or gradient norm (updates skipped)
    nonfinite_first = 0

    def save(at: int) -> None:
        nonlocal last_saved
        if nonfinite_streak:
            if log_rank:
                logger.warning("step %d: not saving a checkpoint: the loss of this step was not finite", at)
            return
        if not _parameters_finite(model, env):
            raise NonFiniteLossError(
                f"step {at}: model parameters are not finite; refusing to save a poisoned checkpoint under "
                f"{args.save} (last saved: {last_saved or 'none this run'}); lower --lr and resume from it")
        try:
            ckpt.save_checkpoint(args.save, at, model, optimizer, scheduler, mixer, args, env, names)
        except (OSError, RuntimeError) as e:
            from odm_megatron.output_errors import describe_write_error, is_write_error

            # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."): ask the disk
            cause = e if is_write_error(e) else _write_problem(args.save)
            if cause is None:
                raise
            raise ConfigError(describe_write_error(cause, getattr(e, "filename", None) or ckpt.iteration_dir(args.save, at),
                                                   "--save")
                              + f" (the checkpoint of step {at} was not completed; the last complete one "
                                f"({'step ' + str(last_saved) if last_saved else 'from before this run, if any'}) "
                                f"is kept)") from None
        last_saved = at

    # --- the loop ----------------------------------------------------------------------------
    for step in range(iteration, args.train_iters):
        t0 = time.perf_counter()
        weights = mixer.weights_for_step(step)
        batches = []
        for micro in range(args.num_microbatches):
            batch = next(data_iter)
            _check_token_ids(batch, data.train.vocab_size, names)
            if args.log_sample_order:
                order_log.log(step + 1, micro, batch["dataset_id"].tolist(), batch.pop("position").tolist())
            batches.append(batch_to_device(batch, env.device))

        nonfinite = torch.zeros(len(names), dtype=torch.int64, device=env.device)
        local_loss = forward_backward(model, batches, mixer, args, env, nonfinite)
        allreduce_data_parallel_grads(model, env)
        allreduce_tied_embedding_grads(model, env)
        grad_norm = clip_grad_norm(model, args.clip_grad, env)
        lr = scheduler.current_lr
        last_loss = _global_mean_loss(local_loss, env)  # the same on every rank, as grad_norm
        finite = math.isfinite(last_loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            scheduler.step()
        # else: skip the update (Megatron-LM skips a step whose gradients hold inf/nan), so the model
        # and the optimizer stay finite; the data of the step is consumed all the same
        optimizer.zero_grad(set_to_none=True)
        record = mixer.step_end(step)
        iteration = step + 1
        if not finite:
            nonfinite_streak += 1
            if nonfinite_streak == 1:
                nonfinite_first = iteration
                bad = _nonfinite_domains(nonfinite, names, env)  # collective; every rank is here
                if log_rank:
                    logger.warning(
                        "step %d: %s (loss %s, gradient norm %s)%s; the update is skipped and no checkpoint is "
                        "saved while this lasts; training stops after %s such steps in a row "
                        "(--max-nonfinite-steps)", iteration,
                        "non-finite loss" if not math.isfinite(last_loss) else "non-finite gradient norm",
                        last_loss, grad_norm, f" in domain(s) {', '.join(bad)}" if bad else "",
                        args.max_nonfinite_steps or "no number of")
        elif nonfinite_streak:
            if log_rank:
                logger.warning("step %d: the loss is finite again after %d skipped step(s) from step %d",
                               iteration, nonfinite_streak, nonfinite_first)
            nonfinite_streak = 0
        step_time = time.perf_counter() - t0
        metrics.log_train(iteration, last_loss, lr, grad_norm, tokens_per_step / step_time, step_time)
        if record is not None:
            line = record.to_json(names)  # steps 1-based, as the iterations
            metrics.log_mixture(line)
            order_log.log_update(line)
        if log_rank and (iteration % args.log_interval == 0 or iteration == 1 or iteration == args.train_iters):
            logger.info(console_train_line(iteration, args.train_iters, last_loss, lr, grad_norm,
                                           tokens_per_step / step_time, step_time, names, weights))
        if args.max_nonfinite_steps and nonfinite_streak >= args.max_nonfinite_steps:
            metrics.close()
            order_log.close()
            raise NonFiniteLossError(
                f"stopped at step {iteration}: the loss or gradient norm was not finite for {nonfinite_streak} "
                f"step(s) in a row (from step {nonfinite_first}; --max-nonfinite-steps {args.max_nonfinite_steps}); "
                f"their updates were skipped and nothing was saved after "
                f"{'step ' + str(last_saved) if last_saved else 'the start'}: lower --lr or check those domains' "
                f"data, then resume from the last checkpoint")

        if args.eval_interval > 0 and iteration % args.eval_interval == 0:
            run_eval(iteration)
        # the last step's checkpoint comes after the final evaluation (below): a run killed in
        # between resumes before the last step instead of skipping (or repeating) that evaluation
        if args.save and args.save_interval and iteration % args.save_interval == 0 and iteration < args.train_iters:
            save(iteration)
        if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
            if args.save and last_saved != iteration:
                save(iteration)
            if log_rank:
                logger.info("exiting at step %d (--exit-interval %d)", iteration, args.exit_interval)
            break
    else:
        if args.eval_interval > 0 and evaluated_at != iteration and iteration > resumed_at:
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
