#!/usr/bin/env bash
# The whole life of a small GPT on a laptop CPU, in a few minutes and with no download:
# the Python standard library's own source code is the corpus.
#
#   raw text -> clean -> train a BPE tokenizer -> tokenize into .bin/.idx -> pre-train -> sample
#
# Everything is written under quickstart_out/ (OUT=... to change it); the end lists what is where and
# the commands to go on with. Extra arguments go to pretrain_gpt.py, e.g.
# `bash examples/quickstart.sh --train-iters 50`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quickstart_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "1/6 corpus: the Python standard library's sources as jsonl, and the text after them held out"
$PYTHON tools/make_stdlib_corpus.py --output "$OUT/raw.jsonl" --max-mb 12 --held-out "$OUT/heldout.txt"

step "2/6 clean: normalise, drop exact and near duplicates (code is not prose: quality rules off)"
$PYTHON tools/clean_corpus.py --input "$OUT/raw.jsonl" --output "$OUT/clean.jsonl" \
    --rejected "$OUT/rejected.jsonl" --no-quality --workers 2 --no-progress

step "3/6 tokenizer: byte-level BPE, 4096 tokens"
$PYTHON tools/train_tokenizer.py --input "$OUT/clean.jsonl" --vocab-size 4096 \
    --output-dir "$OUT/tokenizer" --no-progress

step "4/6 tokenize into Megatron .bin/.idx"
$PYTHON tools/preprocess_data.py --input "$OUT/clean.jsonl" --output-prefix "$OUT/stdlib" \
    --json-keys text --tokenizer-type MegaBPE --tokenizer-model "$OUT/tokenizer" --append-eod \
    --workers 2 --no-progress

step "5/6 pre-train a 4-layer GPT (Llama-style) on it"
rm -rf "$OUT/checkpoints"
$PYTHON pretrain_gpt.py \
    --data-path "$OUT/stdlib_text_document" --split 98,2,0 \
    --tokenizer-type MegaBPE --tokenizer-model "$OUT/tokenizer" \
    --num-layers 4 --hidden-size 192 --num-attention-heads 4 --num-query-groups 2 --seq-length 128 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --attention-dropout 0 --hidden-dropout 0 \
    --micro-batch-size 16 --global-batch-size 32 --train-iters 150 \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 15 --lr-decay-style cosine --weight-decay 0.1 \
    --adam-beta2 0.95 --log-interval 10 --eval-interval 75 --eval-iters 3 \
    --save "$OUT/checkpoints" --tensorboard-dir "$OUT/tensorboard" "$@"

step "6/6 sample from the model"
$PYTHON tools/generate.py --load "$OUT/checkpoints" --prompt "def " --max-new-tokens 120 \
    --temperature 0.7 --top-k 40 --seed 0

cat <<EOF

==> done. Everything is under $OUT/:
  corpus       $OUT/raw.jsonl, cleaned: $OUT/clean.jsonl
  held-out     $OUT/heldout.txt (text that follows the corpus, not trained on)
  tokenizer    $OUT/tokenizer/
  dataset      $OUT/stdlib_text_document.bin and .idx
  checkpoints  $OUT/checkpoints/
  tensorboard  $OUT/tensorboard/

Next, from $(pwd):
  $PYTHON tools/generate.py --load $OUT/checkpoints --prompt "def parse_args(" --max-new-tokens 200 --temperature 0.8 --top-k 40
  $PYTHON tools/evaluate.py --load $OUT/checkpoints --task perplexity --input $OUT/heldout.txt
  $PYTHON tools/convert_checkpoint.py --loader megalm --saver hf --load-dir $OUT/checkpoints --save-dir $OUT/hf_model
  tensorboard --logdir $OUT/tensorboard
EOF
