"""Online data mixing in a DeepSpeed training loop.

DeepSpeed owns the model, the optimizer and the checkpoint; the mixer owns the sample order and
the bandit. Three things must stay in step for a run to resume exactly, and this module is the
few lines that keep them so::

    parser = argparse.ArgumentParser()
    add_odm_args(parser)                       # --odm-policy --odm-prior --odm-update-interval ... (as everywhere)
    args = parser.parse_args()
    odm = OdmConfig.from_args(args)            # validated once; ConfigError names the flag
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    mixer = odm_ds.build_mixer(odm, dataset, engine, seed)                      # the engine's batch size and device
    load_path, client_state = odm_ds.load_checkpoint(engine, ckpt_dir, mixer)   # (None, None): fresh run
    loader = odm_ds.build_dataloader(dataset, mixer, engine)                    # starts where the mixer is
    for batch in loader:                                                       # one micro-batch
        per_token_loss = model_loss(engine, batch)                             # [b, s], reduction="none"
        mixer.accumulate(per_token_loss, batch["loss_mask"], batch["dataset_id"])
        engine.backward(masked_mean(per_token_loss, batch["loss_mask"]))
        engine.step()
        record = odm_ds.step_end(engine, mixer)                                # every rank; an UpdateRecord
        if time_to_save:                                                       #   every update_interval steps
            odm_ds.save_checkpoint(engine, ckpt_dir, mixer)                    # every rank (collective)

- :func:`build_mixer` takes the global batch size from the engine (``train_batch_size()``, which
  :func:`build_dataloader` checks) and the loss device from ``engine.device``; building
  ``OnlineMixer(MixerConfig(...), prior, ...)`` by hand keeps working (``OdmConfig.mixer_config``
  and ``OdmConfig.resolve_prior`` give both from the same settings);
- the bandit state travels in DeepSpeed's ``client_state`` under :data:`ODM_CLIENT_STATE_KEY`
  (plain Python, so it loads under ``torch.load(weights_only=True)``);
- the data loader's start (``consumed_samples``) is derived from the restored mixer, not passed
  separately, so it cannot disagree with it;
- the mixer's step counter follows ``engine.global_steps`` (DeepSpeed counts a step at each
  gradient-accumulation boundary, skipped fp16-overflow steps included), so gradient accumulation
  inside ``engine.step()`` needs no bookkeeping in user code.

Do not pass ``training_data=`` to ``deepspeed.initialize``: DeepSpeed would wrap the dataset in
its own ``DistributedSampler``; use :func:`build_dataloader` instead.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from odm_megatron.config import OdmConfig, add_odm_args
from odm_megatron.dataset import OnlineBlendedDataset
from odm_megatron.errors import CheckpointError, ConfigError
from odm_megatron.mixer import OnlineMixer, UpdateRecord
from odm_megatron.sampler import OnlineMixingBatchSampler

logger = logging.getLogger(__name__)

__all__ = ["OdmConfig", "add_odm_args", "build_mixer", "build_dataloader", "step_end", "save_checkpoint",
           "load_checkpoint", "data_parallel_layout", "OdmCheckpointError", "ODM_CLIENT_STATE_KEY"]

ODM_CLIENT_STATE_KEY = "odm"
"""Key of the bandit state in DeepSpeed's ``client_state``."""

UNBOUNDED_SAMPLES = 2**62
"""``total_samples`` when none is given: the stream is unbounded (domains start new epochs)."""

DataParallelLayout = Tuple[int, int]  # (data-parallel rank, data-parallel size)


OdmCheckpointError = CheckpointError
"""The old name of the project's checkpoint error (a DeepSpeed checkpoint and the mixer do not
belong together): the same class as :class:`odm_megatron.errors.CheckpointError`."""


def data_parallel_layout(engine: Any) -> DataParallelLayout:
    """``(dp_rank, dp_size)`` of this process in ``engine``'s data-parallel group.

    Under DeepSpeed's pipeline or model parallelism the data-parallel group is smaller than the
    world; the sampler must split each global batch over that group only.
    """
    size = int(engine.dp_world_size)
    if size == 1 or not (dist.is_available() and dist.is_initialized()):
        return 0, size
    group = getattr(engine, "data_parallel_group", None)
    return dist.get_rank(group=group), size


def build_mixer(
    odm: OdmConfig,
    dataset: OnlineBlendedDataset,
    engine_or_global_batch_size: Union[Any, int],
    seed: Optional[int] = None,
    natural_weights: Optional[Sequence[float]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> OnlineMixer:
    """The mixer for ``dataset`` with the user's ``--odm-*`` settings (:class:`OdmConfig`).

    ``engine_or_global_batch_size``: a DeepSpeed engine (its ``train_batch_size()`` and
    ``device``) or the global batch size. ``seed`` defaults to the dataset's; "natural" in
    ``--odm-prior`` means ``natural_weights`` if given, else each domain's number of samples.
    Raises :class:`~odm_megatron.errors.ConfigError` (a prior of the wrong length, domain names
    that differ from the dataset's, ...).
    """
    names = list(dataset.domain_names)
    if odm.domain_names is not None and list(odm.domain_names) != names:
        raise ConfigError(f"--odm-domain-names {odm.domain_names} differ from the dataset's domains {names}")
    if isinstance(engine_or_global_batch_size, numbers.Integral):
        global_batch_size = engine_or_global_batch_size
    else:
        engine = engine_or_global_batch_size
        global_batch_size = int(engine.train_batch_size())
        if device is None:
            device = getattr(engine, "device", None)
    natural = dataset.num_samples_per_domain if natural_weights is None else natural_weights
    prior = odm.resolve_prior(names, natural)
    config = odm.mixer_config(names, seed=dataset.seed if seed is None else int(seed),
                              global_batch_size=global_batch_size)
    return OnlineMixer(config, prior=prior, num_samples_per_domain=dataset.num_samples_per_domain, device=device)


def build_dataloader(
    dataset: OnlineBlendedDataset,
    mixer: OnlineMixer,
    engine_or_layout: Union[Any, DataParallelLayout],
    micro_batch_size: Optional[int] = None,
    consumed_samples: Optional[int] = None,
    total_samples: Optional[int] = None,
    num_workers: int = 0,
    prefetch_factor: Optional[int] = None,
    pin_memory: bool = False,
    collate_fn: Optional[Callable] = None,
    **loader_kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` driven by ``mixer``: this rank's micro-batches, in order.

    ``engine_or_layout``: a DeepSpeed engine (data-parallel rank/size, micro batch size and
    global batch size are read from it and checked against the mixer) or ``(dp_rank, dp_size)``.
    ``consumed_samples`` defaults to where the mixer is (``completed_steps * global_batch_size``),
    which after :func:`load_checkpoint` is where the checkpoint was taken; passing another value
    is an error, because the mixer can only hand out the steps that follow its own.
    ``total_samples`` defaults to an unbounded stream. The loader's prefetch depth is checked
    against the mixer's lag (:meth:`~odm_megatron.mixer.OnlineMixer.validate_prefetch`).
    """
    gbs = mixer.config.global_batch_size
    if isinstance(engine_or_layout, tuple):
        dp_rank, dp_size = (int(v) for v in engine_or_layout)
        if micro_batch_size is None:
            raise ValueError("build_dataloader: micro_batch_size is required with a (dp_rank, dp_size) layout")
    else:
        engine = engine_or_layout
        dp_rank, dp_size = data_parallel_layout(engine)
        engine_mbs = int(engine.train_micro_batch_size_per_gpu())
        if micro_batch_size is None:
            micro_batch_size = engine_mbs
        elif micro_batch_size != engine_mbs:
            raise ValueError(
                f"build_dataloader: micro_batch_size {micro_batch_size} differs from the engine's "
                f"train_micro_batch_size_per_gpu {engine_mbs}"
            )
        if int(engine.train_batch_size()) != gbs:
            raise ValueError(
                f"build_dataloader: the mixer's global batch size {gbs} differs from DeepSpeed's "
                f"train_batch_size {engine.train_batch_size()}; build MixerConfig with "
                f"global_batch_size=engine.train_batch_size()"
            )
    expected = mixer.completed_steps * gbs
    if consumed_samples is None:
        consumed_samples = expected
    elif consumed_samples != expected:
        raise ValueError(
            f"build_dataloader: consumed_samples={consumed_samples} but the mixer has completed "
            f"{mixer.completed_steps} steps of {gbs} samples ({expected}); restore the mixer with "
            f"load_checkpoint() and leave consumed_samples out"
        )
    sampler = OnlineMixingBatchSampler(
        mixer,
        total_samples=UNBOUNDED_SAMPLES if total_samples is None else int(total_samples),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
    )
    mixer.validate_prefetch(num_workers, prefetch_factor, sampler.num_microbatches)
    if num_workers > 0 and prefetch_factor is not None:
        loader_kwargs["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        **loader_kwargs,
    )


def step_end(engine: Any, mixer: OnlineMixer) -> Optional[UpdateRecord]:
    """Call after every ``engine.step()``, on every rank: ends the mixer's step when DeepSpeed
    completed one (a gradient-accumulation boundary), else does nothing.

    Returns the :class:`~odm_megatron.mixer.UpdateRecord` when that step closed an update window
    (the policy update is collective: every rank must call this).
    """
    done = int(engine.global_steps)
    if done == mixer.completed_steps:
        return None  # inside a gradient-accumulation cycle
    if done != mixer.completed_steps + 1:
        raise OdmCheckpointError(
            f"DeepSpeed has completed {done} steps but the mixer {mixer.completed_steps}: call "
            f"step_end(engine, mixer) after every engine.step(), and restore both from the same "
            f"checkpoint with load_checkpoint(engine, dir, mixer)"
        )
    return mixer.step_end(mixer.completed_steps)


def save_checkpoint(
    engine: Any,
    save_dir: str,
    mixer: OnlineMixer,
    tag: Optional[str] = None,
    client_state: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> Any:
    """``engine.save_checkpoint`` with the bandit state in ``client_state``.

    Collective, like ``engine.save_checkpoint`` itself: ``mixer.state_dict()`` sums the unfinished
    update window over all ranks, so every rank must call this at the same step. Saving between
    ``engine.step()`` and :func:`step_end` is refused: the checkpoint would hold a model one step
    ahead of the sample stream.
    """
    if mixer.completed_steps != int(engine.global_steps):
        raise OdmCheckpointError(
            f"save_checkpoint: the mixer has completed {mixer.completed_steps} steps, DeepSpeed "
            f"{engine.global_steps}; call step_end(engine, mixer) after engine.step() before saving"
        )
    state = dict(client_state or {})
    if ODM_CLIENT_STATE_KEY in state:
        raise ValueError(f"client_state already has a {ODM_CLIENT_STATE_KEY!r} entry; it is reserved for the bandit state")
    state[ODM_CLIENT_STATE_KEY] = mixer.state_dict()
    return engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)


def load_checkpoint(
    engine: Any,
    load_dir: str,
    mixer: OnlineMixer,
    tag: Optional[str] = None,
    **kwargs: Any,
) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """``engine.load_checkpoint`` that also restores ``mixer``; returns DeepSpeed's
    ``(load_path, client_state)`` with the bandit entry removed.

    ``(None, None)`` when there is no checkpoint (DeepSpeed's own convention; the mixer is left
    fresh). With ``load_module_only=True`` (a warm start: weights only, a new run) the mixer is
    left fresh too. Otherwise a checkpoint without a bandit state, or one whose step count differs
    from the engine's, raises :class:`OdmCheckpointError`; a state from other domains, seed,
    dataset sizes, batch size or policy raises :class:`~odm_megatron.state.BanditStateError`.
    """
    load_path, client_state = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if load_path is None:
        logger.info("no DeepSpeed checkpoint under %s: the mixer starts fresh", load_dir)
        return None, None
    client_state = dict(client_state or {})
    state = client_state.pop(ODM_CLIENT_STATE_KEY, None)
    if kwargs.get("load_module_only"):
        logger.info("load_module_only: loaded weights from %s, the mixer starts fresh", load_path)
        return load_path, client_state
    if state is None:
        raise OdmCheckpointError(
            f"DeepSpeed checkpoint {load_path} has no bandit state (client_state[{ODM_CLIENT_STATE_KEY!r}]); "
            f"was it saved with odm_megatron.integrations.deepspeed.save_checkpoint? "
            f"To warm-start from it, pass load_module_only=True"
        )
    from odm_megatron.state import BanditState

    # verified (format, version, sha256) and named; plain data, so nothing in it was executed
    mixer.load_bandit_state(BanditState.from_dict(state, source=f"DeepSpeed checkpoint {load_path}"))
    if mixer.completed_steps != int(engine.global_steps):
        raise OdmCheckpointError(
            f"DeepSpeed checkpoint {load_path}: the engine resumes at step {engine.global_steps} but "
            f"the bandit state at step {mixer.completed_steps}"
        )
    logger.info(
        "resumed online mixing at step %d from %s (weights %s)",
        mixer.completed_steps, load_path, mixer.current_weights.round(4).tolist(),
    )
    return load_path, client_state
