#!/usr/bin/env bash
# ODM pretraining of a GPT on GPUs: data parallel across nodes, optional tensor/pipeline parallel.
#
# Run on every node (e.g. from a Slurm step), after preprocessing The Pile with
#   odm-megatron train-tokenizer --input /data/pile/train/*.jsonl.zst --vocab-size 50304 --output /data/pile/tok
#   odm-megatron preprocess --input /data/pile/train/*.jsonl.zst --tokenizer-model /data/pile/tok.model \
#       --output-dir /data/pile/shards --workers 64 --append-eod
#   odm-megatron preprocess --input /data/pile/val.jsonl.zst --tokenizer-model /data/pile/tok.model \
#       --output-dir /data/pile/val_shards --workers 16 --append-eod
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (Slurm: derive them from SLURM_*),
# GPUS_PER_NODE (default 8). nccl is chosen automatically when GPUs are present.
#
# Only data parallelism is exercised by odm-megatron's CPU test suite; TP/PP are wired through
# megatron-core (its parallel_state and pipeline schedules) but untested here: check a short run
# against TP=PP=1 before a long one.
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-/data/pile}
RUN=${RUN:-/checkpoints/gpt-1b-odm}
TP=${TP:-1}
PP=${PP:-1}

torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m odm_megatron train \
    --manifest "$DATA/shards/manifest.json" --valid-manifest "$DATA/val_shards/manifest.json" \
    --data-cache-path "$RUN/data_cache" \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \
    --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --micro-batch-size 4 --global-batch-size 512 --train-iters 50000 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --seed 1234 --bf16 \
    --policy odm-exp3 --prior natural --update-interval 1 --odm-alpha 0.9 --odm-lag 2 \
    --num-workers 1 \
    --eval-interval 1000 --eval-iters 4 --log-interval 10 --log-dir "$RUN/logs" \
    --save "$RUN/checkpoints" --save-interval 1000 --load "$RUN/checkpoints"
