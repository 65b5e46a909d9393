#!/usr/bin/env bash
# GRPO on a verifiable toy task, on a CPU in a few minutes: the sums of two numbers below $MAX
# ("7+5=" -> "12"). A tiny model is fine-tuned briefly on worked sums (SFT) until it answers in the
# right form but often wrongly; GRPO then samples 8 answers per question, rewards the exact ones
# (megalm.posttrain.rewards:exact_match_answer) and raises the mean reward of its samples.
# Everything is made here: a character-level tokenizer, the data, the base model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-grpo_arithmetic_out}
MAX=${MAX:-10}
SFT_ITERS=${SFT_ITERS:-80}
GRPO_ITERS=${GRPO_ITERS:-60}
GRPO_LR=${GRPO_LR:-1e-3}
mkdir -p "$OUT"
rm -rf "$OUT/base" "$OUT/sft" "$OUT/grpo"

$PYTHON - "$OUT" "$MAX" <<'PY'
import json, os, random, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
out = sys.argv[1]
# One token per character: the model sees the digits of a number one by one.
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
alphabet = pre_tokenizers.ByteLevel.alphabet()
tok.train_from_iterator(["0123456789+="], trainers.BpeTrainer(
    vocab_size=len(alphabet) + len(specials), special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
os.makedirs(f"{out}/tok", exist_ok=True)
tok.save(f"{out}/tok/tokenizer.json")
with open(f"{out}/tok/tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, f)
rng = random.Random(0)
top = int(sys.argv[2])
pairs = [(a, b) for a in range(top) for b in range(top)]
rng.shuffle(pairs)
held_out, train = pairs[:len(pairs) // 5], pairs[len(pairs) // 5:]
with open(f"{out}/sft.jsonl", "w") as f:  # worked sums: the format, and some of the arithmetic
    for a, b in train:
        f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
with open(f"{out}/prompts.jsonl", "w") as f:  # the same questions without answers: GRPO checks them
    for a, b in train:
        f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
with open(f"{out}/held_out.jsonl", "w") as f:
    for a, b in held_out:
        f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
PY

MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 --seq-length 16
       --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
       --attention-dropout 0 --hidden-dropout 0)
TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tok/tokenizer.json")

accuracy() {  # greedy answers to the training and the held-out sums
    $PYTHON - "$1" "$OUT" <<'PY'
import json, sys
import torch
from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
from megalm.data.tokenizer.huggingface import HuggingFaceTokenizer
from megalm.model import GPTModel
from megalm.model.generation import SamplingParams, generate
found = open_checkpoint(sys.argv[1])
config = checkpoint_config(found)
model = GPTModel(config.model)
model.load_state_dict(found["model"])
model.eval()
tok = HuggingFaceTokenizer(f"{sys.argv[2]}/tok/tokenizer.json")
for split in ("prompts", "held_out"):
    rows = [json.loads(line) for line in open(f"{sys.argv[2]}/{split}.jsonl")]
    out = generate(model, [tok.encode(r["prompt"]) for r in rows], SamplingParams(max_new_tokens=4, temperature=0),
                   vocab_size=config.model.vocab_size, eod=tok.eod)
    right = sum(tok.decode(g.tokens) == r["answer"] for g, r in zip(out, rows))
    print(f"{sys.argv[1]}: greedy accuracy on the {split.replace('_', '-')} sums {right}/{len(rows)} = "
          f"{right / len(rows):.1%}")
PY
}

$PYTHON pretrain_gpt.py --mock-data "${TOKENIZER[@]}" "${MODEL[@]}" --micro-batch-size 1 --train-iters 1 \
    --eval-iters 0 --save "$OUT/base" > "$OUT/base.log"
$PYTHON posttrain_gpt.py --task sft --load "$OUT/base" --save "$OUT/sft" --data-path "$OUT/sft.jsonl" --split 100,0,0 \
    --micro-batch-size 32 --global-batch-size 32 --train-iters "$SFT_ITERS" --lr 3e-3 --lr-warmup-iters 10 \
    --log-interval 25 --eval-iters 0 | grep -E "^iter|saved"
accuracy "$OUT/sft"
$PYTHON posttrain_gpt.py --task grpo --load "$OUT/sft" --save "$OUT/grpo" --data-path "$OUT/prompts.jsonl" \
    --reward-fn megalm.posttrain.rewards:exact_match_answer --num-generations 8 --max-completion-length 4 \
    --temperature 0.7 --micro-batch-size 64 --global-batch-size 128 --train-iters "$GRPO_ITERS" --lr "$GRPO_LR" \
    --lr-decay-style constant --loss-type dapo --log-interval 5 --eval-iters 0 "$@" | grep -E "^grpo|saved"
accuracy "$OUT/grpo"
