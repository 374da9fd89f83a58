#!/usr/bin/env bash
# A tiny ODM pretraining run on CPU, from raw Pile-format JSONL to a plot, in a few minutes.
#
#   bash examples/train_tiny_cpu.sh [WORKDIR] [NPROC]
#
# WORKDIR (default ./odm_tiny) receives the tokenizer, shards, logs, checkpoints and plot.
# NPROC > 1 runs data parallel with torchrun over gloo (one process per core is plenty).
# Input: $TRAIN_JSONL / $VALID_JSONL (one {"text": ..., "meta": {"pile_set_name": ...}} per line);
# by default the demo corpus is built from this Python installation.
set -euo pipefail
WORK=${1:-odm_tiny}
NPROC=${2:-1}
mkdir -p "$WORK"

if [[ -z "${TRAIN_JSONL:-}" ]]; then
  python -c "from odm_megatron.demo_corpus import build_corpus; build_corpus('$WORK/corpus', max_chars_per_domain=600_000)"
  TRAIN_JSONL=$WORK/corpus/train.jsonl
  VALID_JSONL=$WORK/corpus/valid.jsonl
fi

odm-megatron train-tokenizer --input "$TRAIN_JSONL" --vocab-size 2048 --model-type bpe --output "$WORK/tokenizer"
odm-megatron preprocess --input "$TRAIN_JSONL" --tokenizer-model "$WORK/tokenizer.model" \
    --output-dir "$WORK/data/train" --workers 2 --append-eod --overwrite
odm-megatron preprocess --input "$VALID_JSONL" --tokenizer-model "$WORK/tokenizer.model" \
    --output-dir "$WORK/data/valid" --workers 1 --append-eod --overwrite

if [[ "$NPROC" -gt 1 ]]; then
  LAUNCH=(torchrun --nproc_per_node "$NPROC" -m odm_megatron)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  LAUNCH=(python -m odm_megatron)
fi

"${LAUNCH[@]}" train \
    --manifest "$WORK/data/train/manifest.json" --valid-manifest "$WORK/data/valid/manifest.json" \
    --num-layers 2 --hidden-size 128 --num-attention-heads 4 \
    --seq-length 128 --max-position-embeddings 128 \
    --micro-batch-size 4 --global-batch-size 16 --train-iters 200 \
    --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 --seed 1234 \
    --policy odm-exp3 --prior natural --update-interval 1 --odm-alpha 0.9 \
    --eval-interval 50 --eval-iters 2 --log-interval 10 --log-dir "$WORK/logs" \
    --save "$WORK/checkpoints" --save-interval 100 --load "$WORK/checkpoints"

odm-megatron plot "$WORK/logs" --output "$WORK/odm.png"
