#!/usr/bin/env bash
# A tiny GPT on synthetic data: runs on any laptop CPU in about a minute; the loss falls from
# ln(512) = 6.2 towards the entropy of the synthetic stream.
set -euo pipefail
cd "$(dirname "$0")/.."
python pretrain_gpt.py \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 512 \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --attention-dropout 0 --hidden-dropout 0 \
    --micro-batch-size 8 --global-batch-size 32 --train-iters 200 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine --weight-decay 0.1 \
    --log-interval 20 --eval-interval 100 --eval-iters 2 \
    --save checkpoints/tiny_cpu --save-interval 100 "$@"
