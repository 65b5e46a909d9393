#!/usr/bin/env bash
# GPT-2 small (124M) on one GPU, the nanoGPT recipe in Megatron flags.
# DATA: a prefix written by tools/preprocess_data.py with the GPT-2 tokenizer, e.g.
#   python tools/preprocess_data.py --input owt.jsonl --output-prefix data/owt --json-keys text \
#       --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt \
#       --append-eod --workers 16
# 0.5M tokens per step (480 x 1024), 600k steps in the full recipe; shorten --train-iters to try.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/owt_text_document}
TOKENIZER=${TOKENIZER:-gpt2}
python pretrain_gpt.py \
    --data-path "$DATA" --split 990,9,1 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$TOKENIZER/vocab.json" --merge-file "$TOKENIZER/merges.txt" \
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 \
    --attention-dropout 0 --hidden-dropout 0 \
    --micro-batch-size 16 --global-batch-size 480 --train-iters 600000 \
    --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --compile \
    --log-interval 10 --eval-interval 1000 --eval-iters 4 \
    --save checkpoints/gpt2_125m --load checkpoints/gpt2_125m --save-interval 1000 \
    --tensorboard-dir runs/gpt2_125m "$@"
