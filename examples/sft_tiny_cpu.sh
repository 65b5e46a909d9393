#!/usr/bin/env bash
# Chat fine-tuning on a CPU in a few minutes: LoRA on the model `make quickstart` trained.
# Writes 400 synthetic conversations ("What does the cow say?" -> "The cow says moo."), fine-tunes
# with LoRA and packing, merges the adapters, and asks the merged model two questions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
QS=${QS:-quickstart_out}
OUT=${OUT:-sft_tiny_out}
if [ ! -d "$QS/checkpoints" ]; then
    echo "error: $QS/checkpoints not found: run 'make quickstart' first (it trains the base model)" >&2
    exit 2
fi
mkdir -p "$OUT"
$PYTHON - "$OUT/chat.jsonl" <<'PY'
import json, random, sys
sounds = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "pig": "oink", "frog": "croak", "horse": "neigh", "bee": "buzz"}
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        animal = rng.choice(sorted(sounds))
        question = rng.choice(["What does the {} say?", "Which sound does a {} make?", "How does the {} sound?"])
        f.write(json.dumps({"messages": [{"role": "user", "content": question.format(animal)},
                                         {"role": "assistant", "content": f"The {animal} says {sounds[animal]}."}]}) + "\n")
PY
rm -rf "$OUT/lora" "$OUT/merged"
$PYTHON posttrain_gpt.py --task sft --load "$QS/checkpoints" --save "$OUT/lora" \
    --data-path "$OUT/chat.jsonl" --split 95,5,0 --packing \
    --lora-rank 8 --lora-alpha 16 --lora-target-modules all-linear \
    --micro-batch-size 8 --global-batch-size 8 --train-iters 150 --lr 3e-3 --lr-warmup-iters 10 \
    --weight-decay 0 --log-interval 10 --eval-interval 50 --eval-iters 1 "$@"
$PYTHON tools/lora.py merge --load "$OUT/lora" --save "$OUT/merged"
$PYTHON tools/generate.py --load "$OUT/merged" --greedy --max-new-tokens 16 --stop "<|im_end|>" \
    --prompt $'<|im_start|>user\nWhat does the duck say?<|im_end|>\n<|im_start|>assistant\n' \
    --prompt $'<|im_start|>user\nHow does the horse sound?<|im_end|>\n<|im_start|>assistant\n'
