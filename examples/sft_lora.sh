#!/usr/bin/env bash
# LoRA chat fine-tuning of a Hugging Face Llama / Qwen2 / Mistral model on one GPU.
# BASE: a Hugging Face model directory (config.json, *.safetensors, tokenizer files), imported once:
#   python tools/convert_checkpoint.py --loader hf --saver megalm --load-dir $HF --save-dir $CKPT
# DATA: jsonl, one sample per line: {"messages": [{"role": "user", "content": ...}, ...]},
#   {"prompt": ..., "completion": ...} or {"text": ...}. The loss is on assistant tokens only.
# QLoRA: add --lora-base-quantization int4 (base weights held in 4 bits, de-quantized per forward).
# Afterwards: tools/lora.py merge --load checkpoints/sft_lora --save merged, or export the adapter:
#   python tools/convert_checkpoint.py --loader megalm --saver peft --load-dir checkpoints/sft_lora --save-dir adapter
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-checkpoints/llama-3.2-1b}
DATA=${DATA:-data/chat.jsonl}
python posttrain_gpt.py --task sft \
    --load "$CKPT" --save checkpoints/sft_lora --save-interval 200 \
    --data-path "$DATA" --split 98,2,0 --seq-length 2048 --packing \
    --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --lora-target-modules all-linear \
    --micro-batch-size 4 --global-batch-size 32 --train-iters 1000 \
    --lr 2e-4 --min-lr 2e-5 --lr-warmup-iters 30 --lr-decay-style cosine --weight-decay 0 \
    --bf16 --log-interval 10 --eval-interval 200 --eval-iters 4 \
    --tensorboard-dir runs/sft_lora "$@"
