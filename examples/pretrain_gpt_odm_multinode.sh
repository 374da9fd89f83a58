#!/usr/bin/env bash
# ODM pretraining of a 1B GPT on The Pile with Megatron-LM, on GPU nodes: Megatron-LM's own
# pretrain_gpt.py, unmodified, run through the odm-megatron launcher (online data mixing hooked in
# at run time), with Megatron-LM's distributed optimizer, bf16 and torch_dist checkpoints.
#
# Run on every node (e.g. one Slurm task per node), after making the per-domain shards once:
#   odm-megatron train-tokenizer --input /data/pile/train/*.jsonl.zst --vocab-size 50304 --output /data/pile/tok
#   odm-megatron preprocess --input /data/pile/train/*.jsonl.zst --tokenizer-model /data/pile/tok.model \
#       --output-dir /data/pile/shards --workers 64 --append-eod
#   odm-megatron preprocess --input /data/pile/val.jsonl.zst --tokenizer-model /data/pile/tok.model \
#       --output-dir /data/pile/val_shards --workers 16 --append-eod
#
# Environment: MEGATRON_LM_DIR (a checkout of a supported release: core_v0.16.1, core_v0.17.1,
# core_v0.18.2, core_v0.19.0 or main at d98e8a6; docs/integrations.md), NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT (Slurm: derive them from SLURM_*), GPUS_PER_NODE (default 8),
# DATA (default /data/pile), RUN (default /checkpoints/gpt-1b-odm), TP, PP (default 1).
#
# What has run: this exact launcher and these ODM flags with Megatron-LM's loop on CPU (2 gloo
# processes, DP/TP/PP = 2, torch_dist, exact resume; tools/check_megatron_lm.sh). Not yet run on a
# GPU: this script as a whole (bf16, the distributed optimizer, NCCL, multi-node). Check a short
# run (e.g. --train-iters 50 --exit-interval 20, then resume) before a long one.
#
# For experiments on one machine or on CPU, `odm-megatron train` (docs/training.md) is the
# project's own megatron-core trainer; examples/train_tiny_cpu.sh runs it.
set -euo pipefail
: "${MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM checkout}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-/data/pile}
RUN=${RUN:-/checkpoints/gpt-1b-odm}
TP=${TP:-1}
PP=${PP:-1}

# One domain per prefix (the manifest lists them); no weights: --odm-prior natural then weighs
# the domains by their size, as Megatron's blend would.
prefixes() { python -c "from odm_megatron.manifest import Manifest; print(' '.join(Manifest.load('$1').prefixes))"; }
TRAIN_PREFIXES=$(prefixes "$DATA/shards/manifest.json")
VALID_PREFIXES=$(prefixes "$DATA/val_shards/manifest.json")

export CUDA_DEVICE_MAX_CONNECTIONS=1
# The checkout's megatron package first, as when its pretrain_gpt.py is run directly.
export PYTHONPATH="$MEGATRON_LM_DIR${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck disable=SC2086  # the prefix lists are meant to split into words
torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --no-python odm-megatron megatron-lm "$MEGATRON_LM_DIR/pretrain_gpt.py" \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \
    --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --micro-batch-size 4 --global-batch-size 512 --train-iters 50000 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --seed 1234 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tok.model" \
    --train-data-path $TRAIN_PREFIXES --valid-data-path $VALID_PREFIXES \
    --num-workers 1 --data-cache-path "$RUN/data_cache" \
    --odm-policy odm-exp3 --odm-prior natural --odm-update-interval 1 --odm-lag 2 \
    --eval-interval 1000 --eval-iters 4 --log-interval 10 --tensorboard-dir "$RUN/tensorboard" \
    --save "$RUN/checkpoints" --load "$RUN/checkpoints" --save-interval 1000 --ckpt-format torch_dist
# Mixture: $RUN/checkpoints/odm/mixture.jsonl; per-domain validation: $RUN/checkpoints/odm/eval.jsonl;
# plot both with `odm-megatron plot $RUN/checkpoints/odm`.
