"""Flags of ``odm-megatron train``, named as Megatron-LM names them, and their validation.

Megatron users can carry their flags over (``--num-layers``, ``--global-batch-size``,
``--data-path W1 P1 W2 P2``, ...); the mixing flags are the ``--odm-*`` ones every front end shares
(:func:`odm_megatron.config.add_odm_args`; the older ``--policy``, ``--prior`` and
``--update-interval`` stay as aliases). :func:`validate_args` turns every inconsistency it can see
before anything is built into a :class:`ConfigError` with a one-line message, which the CLI
prints and exits with code 2; it leaves the validated mixing settings in ``args.odm_config``
(an :class:`~odm_megatron.config.OdmConfig`).
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from odm_megatron.config import OdmConfig, add_odm_args
from odm_megatron.errors import ConfigError
from odm_megatron.policy import POLICIES

POLICY_CHOICES = tuple(POLICIES)

__all__ = ["ConfigError", "add_arguments", "validate_args", "parse_data_path", "world_size_from_env"]


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every ``train`` flag on ``parser``."""
    g = parser.add_argument_group("model (megatron-core GPTModel, local layer spec)")
    g.add_argument("--num-layers", type=_positive_int, default=4, help="transformer layers")
    g.add_argument("--hidden-size", type=_positive_int, default=128, help="model width")
    g.add_argument("--ffn-hidden-size", type=_positive_int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=_positive_int, default=4, help="attention heads (must divide --hidden-size)")
    g.add_argument("--seq-length", type=_positive_int, default=128, help="tokens per training sample")
    g.add_argument("--max-position-embeddings", type=_positive_int, default=None,
                   help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute", help="as in Megatron-LM")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", help="separate output layer (default: tied to the input embedding)")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout after attention and MLP")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal weight initialisation")
    g.add_argument("--make-vocab-size-divisible-by", type=_positive_int, default=128,
                   help="pad the embedding table to a multiple of this (x tensor parallel size)")

    g = parser.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=_positive_int, default=4, help="samples per forward/backward on each rank")
    g.add_argument("--global-batch-size", type=_positive_int, default=None,
                   help="default: micro batch size x data parallel size (no accumulation)")
    g.add_argument("--train-iters", type=_positive_int, default=None, help="optimizer steps (required)")
    g.add_argument("--exit-interval", type=_positive_int, default=None,
                   help="stop (after saving, if --save) once the iteration is a multiple of this")

    g = parser.add_argument_group("optimizer (AdamW) and learning rate")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=_non_negative_int, default=0, help="linear warm-up steps from 0 to --lr")
    g.add_argument("--lr-decay-iters", type=_positive_int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine", help="decay from --lr to --min-lr after warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip; 0 disables")
    g.add_argument("--max-nonfinite-steps", type=_non_negative_int, default=3,
                   help="a step whose loss or gradient norm is not finite is skipped (no update; reported once, "
                        "with its domains) and never checkpointed; stop with an error after this many in a row "
                        "(1: at the first, as Megatron-LM's --check-for-nan-in-loss-and-grad; 0: never stop)")

    g = parser.add_argument_group("system and parallelism")
    g.add_argument("--seed", type=_non_negative_int, default=1234, help="model initialisation, dropout and data order (the same seed gives the same run)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (fp32 weights)")
    g.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1, help="GPU only")
    g.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1, help="GPU only")
    g.add_argument("--num-workers", type=_non_negative_int, default=0, help="data loader workers per rank")
    g.add_argument("--distributed-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: nccl with GPUs, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=_positive_int, default=10,
                   help="how long a collective (all-reduce, barrier) may wait for the other ranks before "
                        "the job fails (default: 10)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads per process (torch.set_num_threads); on a busy or shared CPU fewer "
                        "threads than cores is often faster (default: torch's own choice)")

    g = parser.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--manifest", default=None, help="DIR/manifest.json written by `odm-megatron preprocess`")
    src.add_argument("--data-path", nargs="+", default=None, metavar="W PREFIX",
                     help="Megatron-style 'W1 PREFIX1 W2 PREFIX2 ...'; the weights are the natural prior "
                          "(--odm-prior natural)")
    vsrc = g.add_mutually_exclusive_group()
    vsrc.add_argument("--valid-manifest", default=None,
                      help="manifest of the validation split (same tokenizer; any domains: trained ones are the "
                           "headline, untrained ones are reported as held-out)")
    vsrc.add_argument("--valid-data-path", nargs="+", default=None, metavar="PREFIX",
                      help="validation prefixes (optionally 'W PREFIX' pairs; weights ignored); domain names "
                           "come from the prefixes, as with --data-path")
    g.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="tokenizer vocabulary size (with --data-path; a manifest records it)")
    g.add_argument("--eod-id", type=_non_negative_int, default=None,
                   help="end-of-document token id (with --data-path; a manifest records it)")
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron-core caches its dataset indices (default: next to the data)")

    g = parser.add_argument_group(
        "online data mixing", "the same --odm-* flags as the Megatron-LM integration; --policy, --prior and "
        "--update-interval are aliases of --odm-policy, --odm-prior and --odm-update-interval")
    add_odm_args(g, aliases=True)

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=_non_negative_int, default=None,
                   help="evaluate every N steps and at the end (0 disables; default: train iters / 10)")
    g.add_argument("--eval-iters", type=_positive_int, default=2,
                   help="per domain, evaluate on the first eval-iters x global-batch-size validation windows")

    g = parser.add_argument_group("logging")
    g.add_argument("--log-dir", default=None, help="mixture.jsonl, eval.jsonl, train.jsonl, TensorBoard events")
    g.add_argument("--log-interval", type=_positive_int, default=10, help="console line every N steps")
    g.add_argument("--log-sample-order", action="store_true",
                   help="write, per rank, the (domain, within-domain position) of every consumed sample")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=_positive_int, default=None, help="save every N steps (and at the end)")
    g.add_argument("--load", default=None, help="resume from the latest complete checkpoint here, if any")


def world_size_from_env() -> int:
    """The launch's world size as torchrun exports it (1 for a plain process)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def parse_data_path(values: List[str]) -> tuple:
    """'W1 P1 W2 P2 ...' -> (weights, prefixes); a lone 'P' (one prefix, no weight) is weight 1."""
    if len(values) == 1:
        return [1.0], [values[0]]
    if len(values) % 2 != 0:
        raise ConfigError(
            f"--data-path takes 'WEIGHT PREFIX' pairs, got {len(values)} values: {' '.join(values)}"
        )
    weights, prefixes = [], []
    for w, p in zip(values[0::2], values[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"--data-path: {w!r} is not a weight (expected 'WEIGHT PREFIX' pairs)") from None
        if not weight >= 0:
            raise ConfigError(f"--data-path: weight {w} of {p!r} must be >= 0")
        weights.append(weight)
        prefixes.append(p)
    if sum(weights) <= 0:
        raise ConfigError("--data-path: the weights sum to zero")
    return weights, prefixes


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None,
                  have_gpu: Optional[bool] = None) -> argparse.Namespace:
    """Fill defaults that depend on other flags and reject inconsistent combinations.

    ``world_size`` defaults to torchrun's WORLD_SIZE, so batch-size arithmetic is checked before
    any process group exists. Raises :class:`ConfigError`.
    """
    import torch

    world_size = world_size_from_env() if world_size is None else world_size
    have_gpu = torch.cuda.is_available() if have_gpu is None else have_gpu
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size

    if args.manifest is None and args.data_path is None:
        raise ConfigError("no training data: give --manifest DIR/manifest.json or --data-path W1 PREFIX1 ...")
    if args.data_path is not None:
        parse_data_path(args.data_path)
        if args.vocab_size is None or args.eod_id is None:
            raise ConfigError("--data-path needs --vocab-size and --eod-id (a --manifest records them)")
        if args.eod_id >= args.vocab_size:
            raise ConfigError(f"--eod-id {args.eod_id} is outside the vocabulary (--vocab-size {args.vocab_size})")
    if args.train_iters is None:
        raise ConfigError("--train-iters is required")

    if (tp > 1 or pp > 1) and not have_gpu:
        raise ConfigError(
            f"tensor/pipeline model parallelism (TP={tp}, PP={pp}) needs GPUs; on CPU use data parallelism "
            "(torchrun --nproc_per_node N) with TP=PP=1"
        )
    if args.bf16 and not have_gpu:
        raise ConfigError(
            "--bf16 needs a GPU: it autocasts the compute, and megatron-core's linear layers re-enter "
            "autocast in backward only on CUDA; train in fp32 on CPU"
        )
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel size {tp} x {pp}"
        )
    dp = world_size // (tp * pp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp} (= {args.micro_batch_size * dp})"
        )

    if args.hidden_size % args.num_attention_heads != 0:
        raise ConfigError(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}"
        )
    if args.num_attention_heads % tp != 0:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by TP size {tp}")
    if args.num_layers % pp != 0:
        raise ConfigError(f"--num-layers {args.num_layers} is not divisible by pipeline parallel size {pp}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}"
        )
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1)")

    if not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if args.min_lr < 0 or args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters > args.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds the decay iterations {args.lr_decay_iters}")
    if args.clip_grad < 0:
        raise ConfigError("--clip-grad must be >= 0")
    if args.weight_decay < 0:
        raise ConfigError("--weight-decay must be >= 0")

    args.odm_config = OdmConfig.from_args(args)  # every mixing rule, checked once (config.py)
    if args.odm_domain_names is not None:
        raise ConfigError("--odm-domain-names is for the Megatron-LM integration: odm-megatron train names "
                          "the domains from the manifest or the --data-path prefixes")
    if args.odm_log is not None:
        raise ConfigError("--odm-log is for the Megatron-LM integration: odm-megatron train writes "
                          "mixture.jsonl under --log-dir")
    if args.data_path is not None:  # the domains are known now: check the prior against them early
        from odm_megatron.dataset import domain_name_from_prefix

        weights, prefixes = parse_data_path(args.data_path)
        args.odm_config.resolve_prior([domain_name_from_prefix(p) for p in prefixes], weights)

    if args.eval_interval is None:
        args.eval_interval = max(1, args.train_iters // 10)
    if args.save_interval is not None and args.save is None:
        raise ConfigError("--save-interval needs --save DIR")
    if args.log_sample_order and args.log_dir is None:
        raise ConfigError("--log-sample-order needs --log-dir")
    if args.manifest is not None and not (os.path.isfile(args.manifest) or os.path.isfile(
            os.path.join(args.manifest, "manifest.json"))):
        raise ConfigError(f"manifest not found: {args.manifest} (make one with `odm-megatron preprocess`)")
    if args.valid_manifest is not None and not (os.path.isfile(args.valid_manifest) or os.path.isfile(
            os.path.join(args.valid_manifest, "manifest.json"))):
        raise ConfigError(f"validation manifest not found: {args.valid_manifest}")
    if args.distributed_backend == "nccl" and not have_gpu:
        raise ConfigError("--distributed-backend nccl needs GPUs")

    args.world_size = world_size
    args.data_parallel_size = dp
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    return args
