#!/usr/bin/env bash
# DPO of an SFT'd Hugging Face Llama / Qwen2 / Mistral model on preference pairs, one GPU, LoRA
# (the reference policy is the base with its adapters switched off: no second copy of the model).
# BASE: a megalm checkpoint of the SFT'd model, imported once:
#   python tools/convert_checkpoint.py --loader hf --saver megalm --load-dir $HF --save-dir $CKPT
# DATA: jsonl, one pair per line: {"prompt": ..., "chosen": ..., "rejected": ...} (strings, or lists of
#   messages), or {"chosen": ..., "rejected": ...} whose common beginning is the prompt.
# Other losses: --dpo-loss ipo|hinge|robust|cdpo|simpo (robust / cdpo: --label-smoothing 0.1;
#   simpo: --simpo-gamma 0.5, no reference). Full fine-tuning: drop the --lora-* flags; the reference
#   is then a frozen copy of $CKPT, or --precompute-ref-logps computes its log-probabilities once.
# A reward model on the same data: --task reward [--center-rewards-coefficient 0.01], then export it
#   for transformers: python tools/convert_checkpoint.py --loader megalm --saver hf \
#   --load-dir checkpoints/reward --save-dir reward_hf   (LlamaForSequenceClassification)
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-checkpoints/llama-3.2-1b-sft}
DATA=${DATA:-data/preferences.jsonl}
python posttrain_gpt.py --task dpo --dpo-loss sigmoid --beta 0.1 \
    --load "$CKPT" --save checkpoints/dpo_lora --save-interval 200 \
    --data-path "$DATA" --split 98,2,0 --seq-length 2048 \
    --lora-rank 16 --lora-alpha 32 --lora-target-modules all-linear \
    --micro-batch-size 4 --global-batch-size 32 --train-iters 1000 \
    --lr 5e-5 --min-lr 5e-6 --lr-warmup-iters 30 --lr-decay-style cosine --weight-decay 0 \
    --bf16 --log-interval 10 --eval-interval 200 --eval-iters 4 \
    --tensorboard-dir runs/dpo_lora "$@"
