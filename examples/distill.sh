#!/usr/bin/env bash
# Distil a big model into a small one with the same tokenizer (both megalm checkpoints, e.g. imported
# from Hugging Face with tools/convert_checkpoint.py). Loss: (1 - ratio) CE + ratio generalized JSD.
# The teacher runs beside the student on each GPU. A teacher too big for that: cache its top-k
# log-probabilities once, then train from the cache with the same data flags:
#   python tools/cache_teacher_logits.py --load "$STUDENT" --teacher-load "$TEACHER" \
#       --teacher-logits cache/teacher --data-path "$DATA" --seq-length 2048 --packing --teacher-top-k 64
#   ... posttrain_gpt.py --task distill --teacher-logits cache/teacher (instead of --teacher-load)
set -euo pipefail
cd "$(dirname "$0")/.."
STUDENT=${STUDENT:-checkpoints/qwen2.5-0.5b}
TEACHER=${TEACHER:-checkpoints/qwen2.5-7b}
DATA=${DATA:-data/chat.jsonl}
torchrun --nproc-per-node "${GPUS:-8}" posttrain_gpt.py --task distill \
    --load "$STUDENT" --teacher-load "$TEACHER" --save checkpoints/distill --save-interval 500 \
    --data-path "$DATA" --split 98,2,0 --seq-length 2048 --packing \
    --kd-loss jsd --kd-beta 0.5 --kd-temperature 1.0 --kd-ratio 0.5 \
    --micro-batch-size 2 --global-batch-size 128 --train-iters 2000 \
    --lr 5e-5 --min-lr 5e-6 --lr-warmup-iters 50 --weight-decay 0.01 \
    --bf16 --log-interval 10 --eval-interval 500 --eval-iters 4 \
    --tensorboard-dir runs/distill "$@"
