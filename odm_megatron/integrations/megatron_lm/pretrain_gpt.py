"""``odm-megatron pretrain-gpt ARGS...``: Megatron-LM's GPT pretraining from the megatron-core wheel.

From 0.17 the megatron-core wheel ships ``megatron.training`` (all of it in 0.19.2), but not
``pretrain_gpt.py``. This module is the GPT case of that script (a model provider with the local
or Transformer Engine layer spec per ``--transformer-impl``, the ``GPTDatasetConfig`` from the
flags, ``get_batch``, ``loss_func`` with the same masking, NaN/Inf/spike checks and ``lm loss``
report, and ``forward_step``), handed to Megatron-LM's own ``megatron.training.pretrain`` with
:func:`~.hooks.install` applied, so that::

    pip install odm-megatron megatron-core==0.19.2
    torchrun --nproc-per-node 8 --no-python odm-megatron pretrain-gpt [Megatron flags] [--odm-* flags]

runs Megatron-LM's training loop with online mixing and no checkout. ARGS are Megatron-LM's
flags (its own parser) plus ``--odm-*``; mixing is on by default (``--odm-policy``).

Left out (refused with one line): context parallelism, ``--spec``, ``--yaml-cfg``, multi-token
prediction, experimental attention variants, heterogeneous layers, SFT and FIM data, ModelOpt.
For those, run the checkout's own script: ``odm-megatron megatron-lm .../pretrain_gpt.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
import sys
from functools import partial
from typing import Any, Callable, List, Optional

logger = logging.getLogger(__name__)

SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py's: a loss 10x the largest seen is "spiky"

_UNSUPPORTED = (
    ("spec", "--spec"), ("yaml_cfg", "--yaml-cfg"), ("mtp_num_layers", "--mtp-num-layers"),
    ("experimental_attention_variant", "--experimental-attention-variant"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"), ("sft", "--sft"),
    ("fim_data", "--fim-data"), ("modelopt_enabled", "ModelOpt"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("megatron_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="Megatron-LM's pretraining flags and the --odm-* flags (--help: Megatron-LM's)")
    # Every token after the sub-command is Megatron-LM's: argparse then sees no option here (a
    # REMAINDER positional alone does not take a leading --flag), and --help reaches Megatron's parser.
    parser.prefix_chars = "\0"


def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn`` with the keyword arguments this release's signature knows (they grew over releases)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _check_supported(args: Any) -> None:
    from .glue import OdmConfigError

    for attr, flag in _UNSUPPORTED:
        if getattr(args, attr, None):
            raise OdmConfigError(f"odm-megatron pretrain-gpt does not support {flag}: run Megatron-LM's own script "
                                 f"with `odm-megatron megatron-lm /path/to/Megatron-LM/pretrain_gpt.py`")
    if int(getattr(args, "context_parallel_size", 1) or 1) > 1:
        raise OdmConfigError("odm-megatron pretrain-gpt does not support --context-parallel-size > 1: run Megatron-LM's "
                             "own script with `odm-megatron megatron-lm /path/to/Megatron-LM/pretrain_gpt.py`")


# -- model ------------------------------------------------------------------------------------------
def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config: Any = None, pg_collection: Any = None, **_: Any) -> Any:
    """A megatron-core ``GPTModel`` as ``gpt_builders.gpt_builder`` builds it (dense or MoE)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    _check_supported(args)
    print_rank_0("building GPT model ...")
    config = config if config is not None else core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    if args.num_experts:
        layer_spec = _call(specs.get_gpt_decoder_block_spec, config, use_transformer_engine=use_te,
                           normalization=args.normalization, qk_l2_norm=getattr(args, "qk_l2_norm", False),
                           vp_stage=vp_stage)
    else:
        make_spec = specs.get_gpt_layer_with_transformer_engine_spec if use_te else specs.get_gpt_layer_local_spec
        layer_spec = _call(make_spec, config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                           config.multi_latent_attention, normalization=config.normalization,
                           qk_l2_norm=getattr(config, "qk_l2_norm", False))
    return _call(
        GPTModel, config=config, transformer_layer_spec=layer_spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


# -- data -------------------------------------------------------------------------------------------
def is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    """Datasets (and loaders) on the first and last pipeline stages, tensor-parallel rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and ps.get_tensor_model_parallel_rank() == 0


def core_gpt_dataset_config_from_args(args: Any) -> Any:
    """pretrain_gpt.py's ``GPTDatasetConfig``: every field this release's config has, from the flags."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    values = {
        "random_seed": args.seed, "sequence_length": args.seq_length, "blend": blend,
        "blend_per_split": blend_per_split, "split": args.split, "path_to_cache": args.data_cache_path,
        "tokenizer": get_tokenizer(), "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask, "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": args.create_attention_mask_in_dataloader,
        "context_parallel_size": args.context_parallel_size, "data_parallel_size": args.data_parallel_size,
        "sequence_parallel_size": args.tensor_model_parallel_size * args.sequence_parallel,
    }
    same_name = ("multiple_validation_sets", "full_validation", "num_dataset_builder_threads", "mmap_bin_files",
                 "object_storage_cache_path", "mid_level_dataset_surplus", "allow_ambiguous_pad_tokens")
    values.update({name: getattr(args, name) for name in same_name if hasattr(args, name)})
    if hasattr(args, "dataloader_fast_cache_load"):
        values["fast_cache_load"] = args.dataloader_fast_cache_load
    if hasattr(args, "dataloader_defer_npy_index_mmap"):
        values["defer_npy_index_mmap"] = args.dataloader_defer_npy_index_mmap
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    return GPTDatasetConfig(**{k: v for k, v in values.items() if k in known})


def train_valid_test_datasets_provider(train_val_test_num_samples: List[int], vp_stage: Optional[int] = None):
    """GPT datasets from megatron-core's builder (the online train split comes from the hooks)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    config = core_gpt_dataset_config_from_args(args)
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    datasets = BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                             partial(is_dataset_built_on_rank, vp_stage=vp_stage), config).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True  # type: ignore[attr-defined]


def get_batch(data_iterator: Any, vp_stage: Optional[int] = None):
    """(tokens, labels, loss_mask, attention_mask, position_ids) of the next micro-batch, read on
    tensor-parallel rank 0 and broadcast to the others (None on middle pipeline stages)."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    args = get_args()
    data = next(data_iterator) if data_iterator is not None else None
    ints = tensor_parallel.broadcast_data(["tokens", "labels", "position_ids"], data, torch.int64)
    loss_mask = tensor_parallel.broadcast_data(["loss_mask"], data, torch.float32)["loss_mask"]
    attention_mask = None
    if args.create_attention_mask_in_dataloader:
        attention_mask = tensor_parallel.broadcast_data(["attention_mask"], data, torch.bool)["attention_mask"]
    return ints["tokens"], ints["labels"], loss_mask, attention_mask, ints["position_ids"]


def loss_func(loss_mask: Any, output_tensor: Any, model: Any = None):
    """pretrain_gpt.py's loss: the masked token-loss sum, the token count, and the ``lm loss``
    report; NaN/Inf (fatal) and spiky losses are reported to the rerun state machine."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                    message=f"found {what} in local forward loss calculation")
    if args.check_for_spiky_loss:
        machine.validate_result(
            result=loss, rejection_func=partial(machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                                context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


def forward_step(data_iterator: Any, model: Any, return_schedule_plan: bool = False):
    """One micro-batch forward: per-token losses and the loss function over them."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    if return_schedule_plan:  # --overlap-moe-expert-parallel-comm
        plan = model.build_schedule_plan(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
        return plan, partial(loss_func, loss_mask, model=model)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask, model=model)


# -- entry point ------------------------------------------------------------------------------------
def run(megatron_args: List[str]) -> None:
    """Megatron-LM's ``pretrain`` on the GPT pieces above, hooks installed."""
    from megatron.core.enums import ModelType

    from odm_megatron.policy import DEFAULT_POLICY

    from .adapters import detect, megatron_version
    from .glue import OdmConfigError
    from .hooks import install

    adapter = detect()
    if not adapter.wheel_has_training or importlib.util.find_spec("megatron.training") is None:
        version, where = megatron_version()
        raise OdmConfigError(
            f"odm-megatron pretrain-gpt needs Megatron-LM's training package, which the megatron-core wheel ships "
            f"from 0.17 (Python 3.12); found megatron-core {version} at {where}: pip install 'megatron-core>=0.17', "
            f"or run a Megatron-LM checkout's script with `odm-megatron megatron-lm /path/to/pretrain_gpt.py`")
    install(policy_default=DEFAULT_POLICY)
    import megatron.training as training

    sys.argv = ["odm-megatron pretrain-gpt", *megatron_args]
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    pieces = dict(train_valid_test_dataset_provider=train_valid_test_datasets_provider, model_provider=model_provider,
                  model_type=ModelType.encoder_or_decoder, forward_step_func=forward_step)
    if adapter.cfg_container is None:  # pretrain() parses the flags itself
        training.pretrain(args_defaults=defaults, **pieces)
        return
    args_module = importlib.import_module(adapter.args_module)
    args = getattr(args_module, adapter.args_function)(args_defaults=defaults)
    module, function = adapter.cfg_container.split(":")
    cfg_container = getattr(importlib.import_module(module), function)(args)
    training.pretrain(cfg_container, **pieces)


def main(args: argparse.Namespace) -> int:
    from .glue import OdmCheckpointError, OdmConfigError

    try:
        run(list(args.megatron_args))
    except (OdmConfigError, OdmCheckpointError) as e:
        logger.error("%s", e)
        return 2
    return 0
