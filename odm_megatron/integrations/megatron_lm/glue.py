"""The hooks of online data mixing in Megatron-LM's training loop (what :func:`.hooks.install` wires in).

Each function here is one hook; :mod:`.hooks` attaches them to Megatron-LM at run time by wrapping
module-level names, and :mod:`.adapters` says which names, per release:

==========================================  =================================================
where (Megatron-LM)                         hook
==========================================  =================================================
Megatron's argument parser                  ``with_odm_args(...)`` as ``extra_args_provider``
the script's dataset provider               ``build_odm_train_dataset(args, config, built)``,
                                            valid/test built with ``odm_dataset_sizes``
the script's ``forward_step``               ``tap(data_iterator)`` / ``dataset_id_of(it)``
the loss function it returns                ``odm_loss_hook(output_tensor, loss_mask, ids, model)``
``build_pretraining_data_loader``           ``build_odm_dataloader(train_ds, args)``
``train_step`` / ``dummy_train_step``       ``odm_step_end(iteration)`` (every rank)
``save_checkpoint``                         ``odm_save_state(args, iteration)`` first (every rank)
==========================================  =================================================

Why it is shaped this way:

- the mixer must exist on **every** rank (``step_end`` and ``state_dict`` are collective; pipeline
  stages without a data loader still advance the domain cursors), so the per-domain datasets are
  built on every rank (megatron-core's builder: rank 0 writes the index cache, the others load
  it), but the train dataset is returned, and a loader built, only where Megatron would build one;
- Megatron's ``get_batch_on_this_tp_rank`` keeps only the tensors it knows, so ``dataset_id`` is
  read off the raw batch by a proxy iterator (:class:`DatasetIdTap`) on the rank that loads data;
  TP ranks > 0 never see it, and they need not: only TP rank 0 of the last pipeline stage
  contributes losses (:class:`~odm_megatron.distributed.FeedbackReducer`);
- the loss hook skips evaluation (``model.training`` is False there): validation batches come
  from megatron-core's ``BlendedDataset`` and must not feed the bandit (they feed the per-domain
  validation of :mod:`.evaluation` instead);
- the bandit state is a small JSON file ``<save>/odm/iter_XXXXXXX.json`` written (atomically, by
  rank 0, after a collective reduction) *before* Megatron writes the checkpoint of that
  iteration, hence before its tracker file names it: a checkpoint Megatron can resume from always
  has its bandit state. It lives next to, not inside, Megatron's state dict because the legacy
  ``torch`` format builds state dicts only on some ranks while the state is collective, and
  ``torch_dist`` refuses non-empty iteration directories; this keeps ``checkpointing.py``
  untouched. It is read back when the train dataset is built, which Megatron does after
  ``load_checkpoint`` has set ``args.iteration``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from odm_megatron.dataset import (OnlineBlendedDataset, TokenizerSpec, build_domain_datasets, domain_name_from_prefix,
                                  make_gpt_dataset_config)
from odm_megatron.config import OdmConfig
from odm_megatron.config import add_odm_args as _add_odm_args
from odm_megatron.config import resolve_prior as _resolve_prior
from odm_megatron.errors import CheckpointError, ConfigError
from odm_megatron.mixer import OnlineMixer, UpdateRecord
from odm_megatron.sampler import OnlineMixingBatchSampler
from odm_megatron.training.metrics import truncate_step_log

try:
    from megatron.core import rerun_state_machine as _rerun_state_machine
except ImportError:  # megatron-core older than the rerun state machine
    _rerun_state_machine = None

logger = logging.getLogger(__name__)

ODM_STATE_DIR = "odm"
"""Subdirectory of ``--save`` holding ``iter_XXXXXXX.json`` bandit states and ``mixture.jsonl``."""


OdmConfigError = ConfigError
"""An ODM flag, or a Megatron flag that ODM does not support, is wrong (one-line message); the
project's one config error (``odm_megatron.errors``), under the name this module always had."""

OdmCheckpointError = CheckpointError
"""A resumed Megatron checkpoint and the bandit state do not belong together."""


# -- flags ----------------------------------------------------------------------------------------
def add_odm_args(parser: argparse.ArgumentParser, policy_default: Optional[str] = None) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: the project's ``--odm-*`` flags (``odm_megatron.config``).
    ODM is on iff ``--odm-policy`` is set (given, or defaulted by ``policy_default``: the
    ``odm-megatron megatron-lm`` launcher)."""
    _add_odm_args(parser, policy_default=policy_default)
    return parser


def with_odm_args(
    other: Optional[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = None,
    policy_default: Optional[str] = None,
) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """An ``extra_args_provider`` adding the ODM flags after ``other``'s (Megatron takes only one)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if other is not None:
            parser = other(parser) or parser
        return add_odm_args(parser, policy_default=policy_default)

    return provider


def is_enabled(args: Any) -> bool:
    return getattr(args, "odm_policy", None) is not None


def check_odm_args(args: Any) -> OdmConfig:
    """The validated ``--odm-*`` settings; rejects Megatron flags online mixing cannot honour,
    naming the flag."""
    odm = OdmConfig.from_args(args)
    unsupported = [
        ("mock_data", "--mock-data"), ("sft", "--sft"), ("fim_data", "--fim-data"),
        ("rampup_batch_size", "--rampup-batch-size"), ("phase_transition_iterations", "--phase-transition-iterations"),
        ("hybrid_context_parallel", "--hybrid-context-parallel"), ("logits_load_dir", "--logits-load-dir"),
    ]
    for attr, flag in unsupported:
        if getattr(args, attr, None):
            raise OdmConfigError(f"--odm-policy does not support {flag}")
    if getattr(args, "dataloader_type", "single") not in (None, "single"):
        raise OdmConfigError(f"--odm-policy needs --dataloader-type single, got {args.dataloader_type!r}")
    return odm


# -- data -----------------------------------------------------------------------------------------
def _blend_list(value: Any) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _parse_blend(values: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's ``[W1] P1 [W2] P2 ...`` -> (prefixes, weights or None)."""
    values = list(values)
    if len(values) % 2 == 0:
        try:
            weights = [float(w) for w in values[0::2]]
            return values[1::2], weights
        except ValueError:
            pass
    return values, None


def train_blend(args: Any) -> Tuple[List[str], Optional[List[float]], bool]:
    """The training domains: (prefixes, weights or None, whole_prefixes).

    ``whole_prefixes`` is True for ``--train-data-path`` / ``--per-split-data-args-path`` (each
    prefix is all training data, no ``--split``) and False for ``--data-path`` /
    ``--data-args-path`` (``--split``'s train part of each prefix, as Megatron does).
    """
    per_split_file = getattr(args, "per_split_data_args_path", None)
    if per_split_file:
        with open(per_split_file, encoding="utf-8") as f:
            train = _blend_list(json.load(f).get("train"))
        if not train:
            raise OdmConfigError(f"--per-split-data-args-path {per_split_file}: no 'train' entry")
        return (*_parse_blend(train), True)
    train = _blend_list(getattr(args, "train_data_path", None))
    if train:
        return (*_parse_blend(train), True)
    data_args_file = getattr(args, "data_args_path", None)
    if data_args_file:
        with open(data_args_file, encoding="utf-8") as f:
            data = f.read().split()
    else:
        data = _blend_list(getattr(args, "data_path", None))
    if not data:
        raise OdmConfigError("--odm-policy needs the training domains in --data-path (or --train-data-path)")
    return (*_parse_blend(data), False)


def domain_names_for(args: Any, prefixes: Sequence[str]) -> List[str]:
    names = getattr(args, "odm_domain_names", None)
    if names:
        if len(names) != len(prefixes):
            raise OdmConfigError(f"--odm-domain-names lists {len(names)} names for {len(prefixes)} prefixes")
        return [str(n) for n in names]
    names = [domain_name_from_prefix(p) for p in prefixes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise OdmConfigError(f"prefixes give the same domain name {duplicates}; name them with --odm-domain-names")
    return names


def resolve_prior(spec: str, names: Sequence[str], blend_weights: Optional[Sequence[float]],
                  num_samples: np.ndarray) -> np.ndarray:
    """``--odm-prior`` -> normalised weights in domain order ("natural": the --data-path weights,
    else samples per domain)."""
    natural = blend_weights if blend_weights is not None else num_samples
    return _resolve_prior(spec, names, natural)


def odm_dataset_sizes(train_val_test_num_samples: Sequence[Optional[int]]) -> List[Optional[int]]:
    """Sizes for Megatron's own builder under ODM: validation and test as usual, no train samples
    (the train split is the online dataset; a size-0 BlendedDataset costs nothing)."""
    sizes = list(train_val_test_num_samples)
    return [0, *sizes[1:]]


@dataclass
class OdmRuntime:
    """What the hooks share within one process (one training run)."""

    mixer: OnlineMixer
    dataset: OnlineBlendedDataset
    log_path: Optional[str]


_runtime: Optional[OdmRuntime] = None


def get_runtime() -> OdmRuntime:
    if _runtime is None:
        raise RuntimeError(
            "online data mixing is not set up on this rank: build_odm_train_dataset() must run on "
            "every rank (train_valid_test_datasets_provider.is_distributed = True)"
        )
    return _runtime


def get_mixer() -> OnlineMixer:
    return get_runtime().mixer


def reset() -> None:
    """Forget this process's mixer (tests; Megatron's in-process restart rebuilds everything)."""
    global _runtime
    _runtime = None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_odm_train_dataset(
    args: Any,
    config_or_tokenizer: Any,
    built_on_rank: bool = True,
) -> Tuple[Optional[OnlineBlendedDataset], OnlineMixer]:
    """The online train dataset and its mixer, from Megatron's flags. Call on every rank.

    ``config_or_tokenizer``: the ``GPTDatasetConfig`` that ``pretrain_gpt.py`` builds from the
    flags (sequence length, masks, cache path, split, ... are taken from it), or anything with
    ``vocab_size`` and ``eod`` (a config is then made from ``args.seed``, ``args.seq_length``,
    ``args.split``, ``args.data_cache_path``). ``built_on_rank``: whether this rank feeds a data
    loader (Megatron's ``is_dataset_built_on_rank()``); elsewhere the dataset returned is None.

    Collective (megatron-core's dataset builder synchronises ranks). On a resumed run
    (``args.iteration > 0``) the bandit state saved with that checkpoint is loaded; a second call
    (virtual pipeline stages) returns the same mixer.
    """
    global _runtime
    if _runtime is not None:
        return (_runtime.dataset if built_on_rank else None), _runtime.mixer
    odm = check_odm_args(args)
    prefixes, weights, whole_prefixes = train_blend(args)
    names = domain_names_for(args, prefixes)
    config = _dataset_config(args, config_or_tokenizer, prefixes[0], whole_prefixes)
    datasets = build_domain_datasets(prefixes, config, domain_names=names)
    dataset = OnlineBlendedDataset(datasets, seed=args.seed, domain_names=names)
    prior = odm.resolve_prior(names, weights if weights is not None else dataset.num_samples_per_domain)
    mixer = OnlineMixer(
        odm.mixer_config(names, seed=args.seed, global_batch_size=args.global_batch_size),
        prior=prior, num_samples_per_domain=dataset.num_samples_per_domain, device=_default_device(),
    )
    _load_state_if_resuming(args, mixer)
    log_path = odm.log
    if log_path is None and getattr(args, "save", None):
        log_path = os.path.join(args.save, ODM_STATE_DIR, "mixture.jsonl")
    if log_path and _is_rank0():  # a resumed run rewrites the updates after its checkpoint; a new run starts afresh
        truncate_step_log(log_path, mixer.completed_steps)
    _runtime = OdmRuntime(mixer=mixer, dataset=dataset, log_path=log_path)
    (logger.info if _is_rank0() else logger.debug)(
        "online data mixing (%s) over %d domains %s; prior %s; samples per domain %s; from step %d",
        odm.policy, len(names), names, np.round(prior, 4).tolist(),
        dataset.num_samples_per_domain.tolist(), mixer.completed_steps,
    )
    return (dataset if built_on_rank else None), mixer


def _dataset_config(args: Any, config_or_tokenizer: Any, first_prefix: str, whole_prefixes: bool) -> Any:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    if isinstance(config_or_tokenizer, GPTDatasetConfig):
        base = config_or_tokenizer
        split = "100,0,0" if whole_prefixes else base.split or "100,0,0"
        fields = {f: getattr(base, f) for f, spec in base.__dataclass_fields__.items() if spec.init}
        # The per-domain builder replaces the blend; only the split must be right here.
        fields.update(blend=([first_prefix], None), blend_per_split=None, split=split)
        return GPTDatasetConfig(**fields)
    split = "100,0,0" if whole_prefixes else getattr(args, "split", None) or "100,0,0"
    tok = config_or_tokenizer
    spec = TokenizerSpec(int(tok.vocab_size), int(tok.eod), getattr(tok, "pad", None))
    return make_gpt_dataset_config(
        args.seed, args.seq_length, spec, path_to_cache=getattr(args, "data_cache_path", None), split=split,
        eod_mask_loss=bool(getattr(args, "eod_mask_loss", False)),
        reset_position_ids=bool(getattr(args, "reset_position_ids", False)),
        reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)),
    )


# -- data loader ----------------------------------------------------------------------------------
def total_train_samples(args: Any) -> int:
    return int(args.train_samples) if getattr(args, "train_samples", None) else int(args.train_iters) * int(args.global_batch_size)


def build_odm_sampler(
    mixer: OnlineMixer, args: Any, consumed_samples: int, dp_rank: int, dp_size: int
) -> OnlineMixingBatchSampler:
    """Megatron's ``MegatronPretrainingSampler`` replaced: same arguments, online order."""
    expected = mixer.completed_steps * mixer.config.global_batch_size
    if consumed_samples != expected:
        raise OdmCheckpointError(
            f"Megatron resumes at {consumed_samples} consumed samples but the bandit state at step "
            f"{mixer.completed_steps} ({expected} samples)"
        )
    return OnlineMixingBatchSampler(mixer, total_train_samples(args), consumed_samples,
                                    args.micro_batch_size, dp_rank, dp_size)


def build_odm_dataloader(
    dataset: Optional[OnlineBlendedDataset],
    args: Any,
    consumed_samples: Optional[int] = None,
    dp_rank: Optional[int] = None,
    dp_size: Optional[int] = None,
) -> Optional[torch.utils.data.DataLoader]:
    """The train DataLoader (None where ``dataset`` is None, as Megatron's own builder).

    Data-parallel rank/size default to megatron-core's parallel state; ``consumed_samples`` to
    ``args.consumed_train_samples``. The loader's prefetch (``--num-workers`` x 2) is checked
    against ``--odm-lag``.
    """
    if dataset is None:
        return None
    mixer = get_mixer()
    if dp_rank is None or dp_size is None:
        from megatron.core import parallel_state

        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if consumed_samples is None:
        consumed_samples = int(args.consumed_train_samples)
    sampler = build_odm_sampler(mixer, args, consumed_samples, dp_rank, dp_size)
    num_workers = int(getattr(args, "num_workers", 0))
    try:
        mixer.validate_prefetch(num_workers, None, sampler.num_microbatches)
    except ValueError as e:
        raise OdmConfigError(f"{e} (--num-workers sets the workers; Megatron's prefetch factor is 2)") from None
    # Its own generator: creating the loader's iterator (which Megatron does after load_checkpoint)
    # then draws its worker base seed from it, not from the global CPU RNG, which on CPU is also
    # dropout's; a resumed CPU run stays identical to the uninterrupted one.
    generator = torch.Generator().manual_seed(int(args.seed))
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0, worker_init_fn=_worker_init_fn(args, num_workers), generator=generator,
    )


def _worker_init_fn(args: Any, num_workers: int) -> Optional[Callable[[int], None]]:
    """Megatron's exit-signal handler in loader workers, as its own loader installs it."""
    if not (getattr(args, "exit_signal_handler", False) and num_workers > 0):
        return None
    from megatron.training.dist_signal_handler import DistributedSignalHandler

    signal = args.exit_signal

    def init(_: int) -> None:
        DistributedSignalHandler(signal).__enter__()

    return init


# -- loss feedback --------------------------------------------------------------------------------
class DatasetIdTap:
    """Iterator proxy that remembers the ``dataset_id`` of the last batch it handed out.

    Megatron's ``get_batch_on_this_tp_rank`` calls ``next()`` and keeps only the tensors it
    knows; wrapping the iterator it is given is the least intrusive way to carry the ids to the
    loss function. The ids are moved to the GPU without blocking, as Megatron moves its batch.
    """

    def __init__(self, inner: Iterator) -> None:
        self.inner = inner
        self.dataset_id: Optional[torch.Tensor] = None
        self.loss_mask: Optional[torch.Tensor] = None
        self.batch_seen = False

    def __iter__(self) -> "DatasetIdTap":
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        ids = batch.get("dataset_id") if isinstance(batch, dict) else None
        mask = batch.get("loss_mask") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor) and torch.cuda.is_available():
            ids = ids.cuda(non_blocking=True)
        self.dataset_id = ids if isinstance(ids, torch.Tensor) else None
        self.loss_mask = mask if isinstance(mask, torch.Tensor) else None
        self.batch_seen = True
        return batch

    def __getattr__(self, name: str) -> Any:  # RerunDataIterator's methods, if anyone asks
        if name == "inner":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def tap(data_iterator: Optional[Iterator]) -> Optional[Iterator]:
    """``data_iterator`` wrapped in a :class:`DatasetIdTap` when ODM is on (None stays None)."""
    if data_iterator is None or _runtime is None:
        return data_iterator
    return DatasetIdTap(data_iterator)


def dataset_id_of(data_iterator: Any) -> Optional[torch.Tensor]:
    """The ``dataset_id`` [b] of the batch last taken from a tapped iterator, else None."""
    return data_iterator.dataset_id if isinstance(data_iterator, DatasetIdTap) else None


def odm_loss_hook(
    output_tensor: torch.Tensor,
    loss_mask: torch.Tensor,
    dataset_id: Optional[torch.Tensor],
    model: Optional[torch.nn.Module] = None,
) -> None:
    """Feed one micro-batch's per-token losses to the mixer (no host synchronisation).

    ``output_tensor``: Megatron's per-token losses (``[b, s]``, any shape with ``b * s``
    elements); ``dataset_id``: ``[b]``, None on ranks that did not load the batch (TP > 0), where
    nothing is recorded. Evaluation (``model.training`` False) is not recorded.
    """
    if _runtime is None or dataset_id is None:
        return
    if model is not None and not model.training:
        return
    if _replaying_step_in_place():
        return
    b = int(dataset_id.numel())
    if b == 0 or output_tensor.numel() % b != 0 or output_tensor.numel() != loss_mask.numel():
        raise ValueError(
            f"odm_loss_hook: cannot split per-token losses {tuple(output_tensor.shape)} / loss mask "
            f"{tuple(loss_mask.shape)} into {b} samples"
        )
    _runtime.mixer.accumulate(output_tensor.detach().reshape(b, -1), loss_mask.reshape(b, -1), dataset_id.reshape(b))


def _replaying_step_in_place() -> bool:
    """True while Megatron's rerun state machine re-executes the current step on the same data
    (``--rerun-mode validate_results`` after a suspicious loss, ``report_stats`` on every step).

    The initial run already fed this micro-batch's losses to the mixer; counting the replay too
    would double the step's weight in the window. A rerun *from a checkpoint* is a new process
    whose mixer was restored from that checkpoint, so it does count. The module global is read
    rather than ``get_rerun_state_machine()``, which would create a machine as a side effect.
    Called per micro-batch: the module is imported once, at the top of this file."""
    if _rerun_state_machine is None:  # megatron-core without the rerun machine: nothing is replayed
        return False
    machine = getattr(_rerun_state_machine, "_GLOBAL_RERUN_STATE_MACHINE", None)
    return machine is not None and machine.state == _rerun_state_machine.RerunState.RERUNNING_IN_PLACE


# -- steps and checkpoints -------------------------------------------------------------------------
def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def odm_step_end(iteration: int) -> Optional[UpdateRecord]:
    """Call on every rank after training step ``iteration`` (0-based: Megatron's ``iteration``
    before its increment), skipped steps included. Every ``--odm-update-interval`` steps this
    all-reduces the losses, updates the weights, logs them and returns the record."""
    runtime = get_runtime()
    record = runtime.mixer.step_end(iteration)
    if record is None:
        return None
    names = runtime.mixer.domain_names
    if _is_rank0():
        line = record.to_json(names)
        logger.info("odm update %d after step %d: weights %s (from step %d)", record.update, line["step"],
                    {n: round(w, 4) for n, w in line["weights"].items()}, line["effective_step"])
        if runtime.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(runtime.log_path)), exist_ok=True)
            with open(runtime.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
    _log_tensorboard(record, names)  # Megatron's writer lives on the last rank; every rank has the record
    return record


def _log_tensorboard(record: UpdateRecord, names: Sequence[str]) -> None:
    try:
        from megatron.training.global_vars import get_tensorboard_writer
    except ImportError:  # not inside Megatron-LM
        return
    writer = get_tensorboard_writer()
    if writer is None:
        return
    for name, w, loss in zip(names, record.weights, record.mean_loss):
        writer.add_scalar(f"odm/weight/{name}", float(w), record.step + 1)
        if np.isfinite(loss):
            writer.add_scalar(f"odm/loss/{name}", float(loss), record.step + 1)


def state_path(root: str, iteration: int) -> str:
    return os.path.join(root, ODM_STATE_DIR, f"iter_{iteration:07d}.json")


def odm_save_state(args: Any, iteration: int) -> Optional[str]:
    """Write the bandit state of checkpoint ``iteration`` under ``args.save``. Collective.

    Call before Megatron's ``save_checkpoint(iteration, ...)`` on every rank. Returns the path
    (on every rank), or None where ODM was never set up (e.g. checkpoint conversion).
    """
    if _runtime is None or not getattr(args, "save", None):
        return None
    mixer = _runtime.mixer
    if mixer.completed_steps != iteration:
        raise OdmCheckpointError(
            f"saving checkpoint {iteration} but the mixer has completed {mixer.completed_steps} steps; "
            f"odm_step_end() must follow every training step"
        )
    path = state_path(args.save, iteration)
    mixer.save(path)  # collective; rank 0 writes (temporary file + rename)
    return path


def _load_state_if_resuming(args: Any, mixer: OnlineMixer) -> None:
    iteration = int(getattr(args, "iteration", 0) or 0)
    if iteration == 0:
        return
    roots = [getattr(args, "load", None), getattr(args, "save", None),
             getattr(args, "non_persistent_global_ckpt_dir", None)]
    candidates = [state_path(r, iteration) for r in dict.fromkeys(r for r in roots if r)]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise OdmCheckpointError(
            f"resuming at iteration {iteration} but no bandit state was saved with that checkpoint "
            f"(looked for {candidates}); a checkpoint converted with Megatron's tools/checkpoint keeps the "
            f"model, not the bandit state: copy {ODM_STATE_DIR}/iter_{iteration:07d}.json from the original "
            f"save directory into {ODM_STATE_DIR}/ under --load; from a checkpoint made without --odm-policy, "
            f"online mixing can start only as a new run (--finetune resets the iteration to 0)"
        )
    try:
        mixer.load(path)
    except (ValueError, RuntimeError, OSError, KeyError) as e:  # checksum, another run's state, unreadable
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OdmCheckpointError(f"{path}: cannot restore the bandit state: {message}") from None
    if mixer.completed_steps != iteration:
        raise OdmCheckpointError(f"{path} holds the bandit state of step {mixer.completed_steps}, not {iteration}")
    consumed = getattr(args, "consumed_train_samples", None)
    if consumed and consumed != iteration * args.global_batch_size:
        raise OdmCheckpointError(
            f"checkpoint {iteration} consumed {consumed} samples, not {iteration} x {args.global_batch_size}: "
            f"online mixing needs a constant global batch size"
        )
    logger.info("resumed online mixing at step %d from %s", iteration, path)
