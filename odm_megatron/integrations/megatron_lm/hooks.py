"""``install()``: online data mixing in Megatron-LM's own training loop, without editing it.

One call before ``pretrain(...)`` (or before importing the script that calls it)::

    from odm_megatron.integrations.megatron_lm import install
    install()
    pretrain(...)                     # --odm-policy NAME turns mixing on

wraps module-level names of ``megatron.training`` (which ones, per release: :mod:`.adapters`):

- ``pretrain``: the dataset provider and the forward step it is given are wrapped (train split =
  the online dataset; per-token losses fed to the bandit, or to per-domain validation), and up to
  0.17 the ``--odm-*`` flags join its ``extra_args_provider``;
- ``parse_and_validate_args`` (0.18+): the ``--odm-*`` flags join its ``extra_args_provider``;
- ``build_pretraining_data_loader``: the online dataset gets the online batch sampler;
- ``train_step`` / ``dummy_train_step``: the end of every step (``--iterations-to-skip`` steps too);
- ``save_checkpoint``: the bandit state is written first; it is read back when the train dataset
  is built on ``--load``;
- ``evaluate_and_print_results``: per-domain validation around each evaluation.

Every wrapper passes straight through when ``--odm-policy`` is not set. Python resolves these
names when they are called (``training.py``'s ``train()`` looks up ``train_step`` in its module),
and ``pretrain_gpt.py`` imports ``pretrain`` (and ``parse_and_validate_args``) when it is
imported, which is why ``install()`` must run before the script is imported.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch

from . import glue
from .adapters import Adapter, detect
from .evaluation import DomainValidation, valid_domain_names, valid_prefixes

logger = logging.getLogger(__name__)

_WRAPPED = "__odm_wrapped__"


@dataclass
class _Installed:
    adapter: Adapter
    policy_default: Optional[str]
    originals: List[Tuple[Any, str, Any]] = field(default_factory=list)
    validation: Optional[DomainValidation] = None


_installed: Optional[_Installed] = None


def installed_adapter() -> Optional[Adapter]:
    return _installed.adapter if _installed is not None else None


def install(policy_default: Optional[str] = None, cpu_standins: Optional[bool] = None) -> Adapter:
    """Hook online data mixing into the imported Megatron-LM; returns the release's adapter.

    ``policy_default``: the ``--odm-policy`` used when the flag is absent (None: mixing only with
    ``--odm-policy``). ``cpu_standins``: apply :mod:`.cpu_standins` (default: when no GPU is
    present; never on a GPU). Idempotent. Raises
    :class:`~.adapters.UnsupportedMegatronError` for a release outside :data:`~.adapters.ADAPTERS`.
    """
    global _installed
    adapter = detect()
    if _installed is not None:
        return _installed.adapter
    if cpu_standins is None:
        cpu_standins = not torch.cuda.is_available()
    if cpu_standins:
        from . import cpu_standins as standins

        standins.apply()
    state = _Installed(adapter, policy_default)
    training = importlib.import_module(adapter.training_module)
    package = importlib.import_module("megatron.training")

    pretrain = getattr(training, adapter.pretrain)
    wrapped_pretrain = _wrap_pretrain(pretrain, adapter, policy_default, state)
    _replace(state, training, adapter.pretrain, wrapped_pretrain)
    if getattr(package, adapter.pretrain, None) is pretrain:  # ``from megatron.training import pretrain``
        _replace(state, package, adapter.pretrain, wrapped_pretrain)
    if adapter.args_function != adapter.pretrain:
        args_module = importlib.import_module(adapter.args_module)
        _replace(state, args_module, adapter.args_function,
                 _wrap_args_function(getattr(args_module, adapter.args_function), policy_default))
    _replace(state, training, adapter.train_step, _wrap_train_step(getattr(training, adapter.train_step)))
    _replace(state, training, adapter.dummy_train_step, _wrap_dummy_train_step(getattr(training, adapter.dummy_train_step)))
    _replace(state, training, adapter.save_checkpoint, _wrap_save_checkpoint(getattr(training, adapter.save_checkpoint)))
    _replace(state, training, adapter.data_loader, _wrap_data_loader(getattr(training, adapter.data_loader)))
    _replace(state, training, adapter.evaluate, _wrap_evaluate(getattr(training, adapter.evaluate), state))
    _installed = state
    _warn_if_imported_before(state)
    logger.debug("odm-megatron hooks installed for Megatron-LM %s", adapter.series)
    return adapter


def _warn_if_imported_before(state: _Installed) -> None:
    """A script that imported ``pretrain`` (or ``parse_and_validate_args``) before ``install()``
    holds the unwrapped function: say so, since mixing would silently be off."""
    main = sys.modules.get("__main__")
    if main is None:
        return
    entry_points = {state.adapter.pretrain, state.adapter.args_function}
    stale = sorted({name for _, name, original in state.originals if name in entry_points
                    for value in list(vars(main).values()) if value is original})
    if stale:
        logger.warning("install() ran after %s imported %s from Megatron-LM: call install() before importing "
                       "megatron.training, or online data mixing stays off", getattr(main, "__file__", "__main__"),
                       ", ".join(stale))


def uninstall() -> None:
    """Put back every wrapped name (tests)."""
    global _installed
    if _installed is None:
        return
    for module, name, original in reversed(_installed.originals):
        setattr(module, name, original)
    _installed = None
    glue.reset()


def _replace(state: _Installed, module: Any, name: str, wrapper: Callable) -> None:
    original = getattr(module, name)
    setattr(wrapper, _WRAPPED, True)
    state.originals.append((module, name, original))
    setattr(module, name, wrapper)


def _args():
    from megatron.training.global_vars import get_args

    return get_args()


# -- arguments ------------------------------------------------------------------------------------
def _wrap_args_function(parse: Callable, policy_default: Optional[str]) -> Callable:
    @functools.wraps(parse)
    def odm_parse_and_validate_args(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(parse).bind_partial(*args, **kwargs)
        bound.arguments["extra_args_provider"] = glue.with_odm_args(bound.arguments.get("extra_args_provider"),
                                                                    policy_default)
        return parse(*bound.args, **bound.kwargs)

    return odm_parse_and_validate_args


# -- pretrain: the script's dataset provider and forward step ------------------------------------
def _wrap_pretrain(pretrain: Callable, adapter: Adapter, policy_default: Optional[str], state: _Installed) -> Callable:
    signature = inspect.signature(pretrain)

    @functools.wraps(pretrain)
    def odm_pretrain(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        a = bound.arguments
        if a.get("train_valid_test_dataset_provider") is not None:
            a["train_valid_test_dataset_provider"] = wrap_dataset_provider(a["train_valid_test_dataset_provider"], state)
        if a.get("forward_step_func") is not None:
            a["forward_step_func"] = wrap_forward_step(a["forward_step_func"], state)
        if adapter.args_function == adapter.pretrain:
            a["extra_args_provider"] = glue.with_odm_args(a.get("extra_args_provider"), policy_default)
        return pretrain(*bound.args, **bound.kwargs)

    return odm_pretrain


def wrap_dataset_provider(provider: Callable, state: Optional[_Installed] = None) -> Callable:
    """The script's ``train_valid_test_datasets_provider`` with the online train split.

    With ``--odm-policy``: Megatron's own provider builds validation and test as before (train
    size 0); the train split is :func:`~.glue.build_odm_train_dataset` from the script's own
    ``GPTDatasetConfig`` (its ``core_gpt_dataset_config_from_args``, else one made from the
    flags). Then it is also ``is_distributed`` (the mixer must exist on every rank: its step end
    is collective); without ``--odm-policy`` everything is the script's own.
    """
    if getattr(provider, _WRAPPED, False):
        return provider
    return _OdmDatasetsProvider(provider, state or _installed)


class _OdmDatasetsProvider:
    """See :func:`wrap_dataset_provider` (a class for its ``is_distributed`` property, which
    Megatron reads after the flags are parsed)."""

    def __init__(self, provider: Callable, state: Optional[_Installed]) -> None:
        functools.update_wrapper(self, provider)  # name, docs, signature (vp_stage) and attributes
        self._provider = provider
        self._state = state
        setattr(self, _WRAPPED, True)

    @property
    def is_distributed(self) -> bool:
        own = bool(getattr(self._provider, "is_distributed", False))
        try:
            return own or glue.is_enabled(_args())
        except (AssertionError, ImportError):  # asked before Megatron parsed its flags
            return own

    def __call__(self, train_val_test_num_samples: Any, *args: Any, **kwargs: Any) -> Any:
        provider = self._provider
        margs = _args()
        if not glue.is_enabled(margs):
            return provider(train_val_test_num_samples, *args, **kwargs)
        glue.check_odm_args(margs)
        _, valid_ds, test_ds = provider(glue.odm_dataset_sizes(train_val_test_num_samples), *args, **kwargs)
        config = _script_dataset_config(provider, margs)
        built = _built_on_rank(provider, kwargs.get("vp_stage"))
        train_ds, mixer = glue.build_odm_train_dataset(margs, config, built)
        state = self._state
        if state is not None and state.validation is None:
            state.validation = _make_validation(margs, mixer)
        return train_ds, valid_ds, test_ds


def _script_function(provider: Callable, name: str) -> Optional[Callable]:
    inner = inspect.unwrap(provider)
    while isinstance(inner, functools.partial):
        inner = inner.func
    return getattr(inner, "__globals__", {}).get(name)


def _script_dataset_config(provider: Callable, args: Any) -> Any:
    """The script's ``GPTDatasetConfig`` (pretrain_gpt.py's ``core_gpt_dataset_config_from_args``),
    else Megatron's tokenizer (a config is then made from the flags)."""
    make_config = _script_function(provider, "core_gpt_dataset_config_from_args")
    if make_config is not None:
        return make_config(args)
    from megatron.training.global_vars import get_tokenizer

    return get_tokenizer()


def _built_on_rank(provider: Callable, vp_stage: Optional[int]) -> bool:
    """Whether Megatron builds a train loader on this rank: the script's ``is_dataset_built_on_rank``,
    else Megatron's rule (first or last pipeline stage, tensor-parallel rank 0)."""
    is_built = _script_function(provider, "is_dataset_built_on_rank")
    if is_built is not None:
        return bool(is_built(vp_stage=vp_stage) if "vp_stage" in inspect.signature(is_built).parameters else is_built())
    from megatron.core import parallel_state as ps

    first_or_last = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)
    return first_or_last and ps.get_tensor_model_parallel_rank() == 0


def _make_validation(args: Any, mixer: Any) -> Optional[DomainValidation]:
    prefixes = valid_prefixes(args)
    if not prefixes or not (getattr(args, "eval_iters", 0) or getattr(args, "full_validation", False)):
        return None
    if getattr(args, "multiple_validation_sets", False):  # one dataset per set: dataset_id is not the prefix
        logger.info("per-domain validation is off with --multiple-validation-sets (Megatron reports each set)")
        return None
    train_prefixes, _, _ = glue.train_blend(args)
    names = valid_domain_names(prefixes, train_prefixes, mixer.domain_names)
    log_path = glue.get_runtime().log_path
    log_dir = os.path.dirname(os.path.abspath(log_path)) if log_path else None
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DomainValidation(names, mixer.domain_names, log_dir, device, resume_step=mixer.completed_steps)


def wrap_forward_step(forward_step: Callable, state: Optional[_Installed] = None) -> Callable:
    """The script's ``forward_step`` with per-token loss feedback by domain.

    The data iterator is wrapped in a :class:`~.glue.DatasetIdTap` (Megatron's ``get_batch``
    drops ``dataset_id``), and the loss function returned is wrapped to pass the per-token losses
    and the loss mask (the ``loss_mask`` that ``forward_step`` binds into its
    ``partial(loss_func, loss_mask, ...)``) to the bandit in training, or to per-domain
    validation in evaluation. Passes through when mixing is off.
    """
    if getattr(forward_step, _WRAPPED, False):
        return forward_step
    state = state or _installed

    @functools.wraps(forward_step)
    def odm_forward_step(*args: Any, **kwargs: Any) -> Any:
        if glue._runtime is None:
            return forward_step(*args, **kwargs)
        args = list(args)
        if args:
            tapped = args[0] = glue.DatasetIdTap(args[0]) if args[0] is not None else None
        else:
            it = kwargs.get("data_iterator")
            tapped = kwargs["data_iterator"] = glue.DatasetIdTap(it) if it is not None else None
        model = args[1] if len(args) > 1 else kwargs.get("model")
        result = forward_step(*args, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
            return result
        output, loss_fn = result
        return output, _feedback_loss(loss_fn, tapped, model, state)

    setattr(odm_forward_step, _WRAPPED, True)
    return odm_forward_step


def _feedback_loss(loss_fn: Callable, tapped: Optional[glue.DatasetIdTap], model: Any,
                   state: Optional[_Installed]) -> Callable:
    bound_mask = None
    if isinstance(loss_fn, functools.partial) and loss_fn.args and isinstance(loss_fn.args[0], torch.Tensor):
        bound_mask = loss_fn.args[0]

    @functools.wraps(loss_fn)
    def odm_loss_func(output_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if tapped is not None and tapped.batch_seen:
            mask = bound_mask
            if mask is None:  # a forward step that binds no mask: the raw batch's (host) mask
                if tapped.loss_mask is None:
                    raise ValueError("online data mixing: the loss function carries no loss mask and the batch has none")
                mask = tapped.loss_mask.to(output_tensor.device, non_blocking=True)
            training = model is None or getattr(model, "training", True)
            if training:
                glue.odm_loss_hook(output_tensor, mask, tapped.dataset_id, model)
            elif state is not None and state.validation is not None:
                state.validation.add(output_tensor, mask, tapped.dataset_id)
        return loss_fn(output_tensor, *args, **kwargs)

    return odm_loss_func


# -- data loader, steps, checkpoints, evaluation ---------------------------------------------------
def _wrap_data_loader(build: Callable) -> Callable:
    @functools.wraps(build)
    def odm_build_pretraining_data_loader(dataset: Any, consumed_samples: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = glue._runtime
        if runtime is not None and dataset is runtime.dataset:
            return glue.build_odm_dataloader(dataset, _args())
        return build(dataset, consumed_samples, *args, **kwargs)

    return odm_build_pretraining_data_loader


def _wrap_train_step(train_step: Callable) -> Callable:
    @functools.wraps(train_step)
    def odm_train_step(*args: Any, **kwargs: Any) -> Any:
        result = train_step(*args, **kwargs)
        if glue._runtime is not None:
            should_exit = bool(result[3])  # (loss_dict, skipped_iter, should_checkpoint, should_exit, ...)
            if not should_exit:  # a step the rerun machine aborts is re-run by the next job
                _step_end(kwargs.get("iteration"))
        return result

    return odm_train_step


def _wrap_dummy_train_step(dummy_train_step: Callable) -> Callable:
    @functools.wraps(dummy_train_step)
    def odm_dummy_train_step(*args: Any, **kwargs: Any) -> Any:
        result = dummy_train_step(*args, **kwargs)
        if glue._runtime is not None:  # a skipped step (--iterations-to-skip) still consumes its batch
            _step_end(None)
        return result

    return odm_dummy_train_step


def _step_end(iteration: Optional[int]) -> None:
    completed = glue.get_mixer().completed_steps
    if iteration is not None and iteration != completed:
        raise glue.OdmCheckpointError(
            f"Megatron runs step {iteration} but the mixer has completed {completed} steps")
    glue.odm_step_end(completed)


def _wrap_save_checkpoint(save_checkpoint: Callable) -> Callable:
    @functools.wraps(save_checkpoint)
    def odm_save_checkpoint(iteration: int, *args: Any, **kwargs: Any) -> Any:
        if glue._runtime is not None:
            glue.odm_save_state(_args(), iteration)  # first: the checkpoint Megatron names has its bandit state
        return save_checkpoint(iteration, *args, **kwargs)

    return odm_save_checkpoint


def _wrap_evaluate(evaluate_and_print_results: Callable, state: _Installed) -> Callable:
    signature = inspect.signature(evaluate_and_print_results)

    @functools.wraps(evaluate_and_print_results)
    def odm_evaluate_and_print_results(*args: Any, **kwargs: Any) -> Any:
        validation = state.validation
        if glue._runtime is None or validation is None:
            return evaluate_and_print_results(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs).arguments
        if "test set" in str(bound.get("prefix", "")):  # Megatron's final evaluation on the test split
            return evaluate_and_print_results(*args, **kwargs)
        validation.start()
        try:
            result = evaluate_and_print_results(*args, **kwargs)
        finally:
            validation.collecting = False
        writer = None
        if bound.get("write_to_tensorboard", True):
            from megatron.training.global_vars import get_tensorboard_writer

            writer = get_tensorboard_writer()
        validation.finish(int(bound["iteration"]), writer)
        return result

    return odm_evaluate_and_print_results
