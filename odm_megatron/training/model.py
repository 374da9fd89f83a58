"""The model: a megatron-core ``GPTModel`` built from the local (pure PyTorch) layer spec.

The local spec needs neither Transformer Engine nor Apex, so the same model runs on a laptop CPU
and on GPUs; with TP/PP > 1 megatron-core splits it (column/row-parallel linears, one stage per
pipeline rank). Weights stay fp32; ``--bf16`` autocasts the compute (see :mod:`.train`).
"""
from __future__ import annotations

import argparse
import logging
import math

import torch
import torch.distributed as dist

from odm_megatron.training.parallel import ParallelEnv

logger = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: the embedding table rows rounded up to a multiple of
    ``divisible_by x TP`` so the vocab-parallel split is even."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_transformer_config(args: argparse.Namespace, env: ParallelEnv):
    """megatron-core ``TransformerConfig`` from the Megatron-named flags."""
    from megatron.core.transformer import TransformerConfig

    extra = {}
    if "cuda_graph_scope" in TransformerConfig.__dataclass_fields__:
        extra["cuda_graph_scope"] = []  # the default "full" only triggers a deprecation warning
    return TransformerConfig(
        **extra,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=env.tp_size,
        pipeline_model_parallel_size=env.pp_size,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        # On CPU, initialise on the CPU path (the GPU path allocates on the current CUDA device).
        use_cpu_initialization=env.device.type == "cpu",
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        variable_seq_lengths=False,
    )


def build_model(args: argparse.Namespace, env: ParallelEnv, vocab_size: int) -> torch.nn.Module:
    """This rank's stage of the GPT, on ``env.device``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = build_transformer_config(args, env)
    padded = padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, env.tp_size)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=padded,
        max_sequence_length=args.max_position_embeddings,
        pre_process=env.is_first_stage,
        post_process=env.is_last_stage,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )
    model.to(env.device)
    params = sum(p.numel() for p in model.parameters())
    logger.info("GPTModel stage %d/%d: %.2fM parameters (vocab %d padded to %d)", env.pp_rank + 1, env.pp_size,
                params / 1e6, vocab_size, padded)
    return model


def tied_embedding_weight(model: torch.nn.Module):
    """The word-embedding/output weight that pipeline stages share, or None on this stage."""
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return None
    return model.shared_embedding_or_output_weight()


def allreduce_tied_embedding_grads(model: torch.nn.Module, env: ParallelEnv) -> None:
    """With PP > 1 and tied embeddings the first stage's embedding and the last stage's output
    layer are copies of one matrix: sum their gradients (megatron's embedding group)."""
    if env.pp_size == 1:
        return
    weight = tied_embedding_weight(model)
    if weight is None or weight.grad is None:
        return
    from megatron.core import parallel_state as ps

    if ps.is_rank_in_embedding_group(ignore_virtual=True):
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def gpt_forward(model: torch.nn.Module, batch: dict, bf16: bool) -> torch.Tensor:
    """One forward pass of this stage. On the last stage, with labels, megatron-core's GPTModel
    returns the per-token loss ``[b, s]`` (fp32); elsewhere the hidden states for the next stage."""
    device_type = batch["tokens"].device.type if "tokens" in batch else "cpu"
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                       labels=batch.get("labels"))
    # fp32 out of the autocast region: the loss for the mixer, hidden states for the pipeline p2p
    # (whose buffers are allocated in config.pipeline_dtype = fp32).
    return output.float() if output.dtype != torch.float32 else output
