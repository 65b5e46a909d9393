#!/usr/bin/env bash
# A Llama-shaped 1.1B model (TinyLlama's shape) on one 8-GPU node with every form of parallelism:
# tensor-parallel 2 (with sequence parallelism) x pipeline-parallel 2 (1F1B) x data-parallel 2 with the
# distributed optimizer. Global batch 512 sequences of 2048 = 2 data-parallel ranks x micro batch 4 x 64
# micro-batches per step (the pipeline bubble is (2 - 1) / 64 = 1.6%).
# Check the layout's memory first: python tools/parallel_plan.py <the same flags> --world-size 8
# DATA / TOKENIZER: a prefix from tools/preprocess_data.py and the tokenizer it used.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/corpus_text_document}
TOKENIZER=${TOKENIZER:-tokenizer/tokenizer.json}
torchrun --nproc-per-node 8 pretrain_gpt.py \
    --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2 \
    --use-distributed-optimizer \
    --data-path "$DATA" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --num-layers 22 --hidden-size 2048 --num-attention-heads 32 --num-query-groups 4 \
    --ffn-hidden-size 5632 --seq-length 2048 \
    --position-embedding-type rope --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-5 \
    --swiglu --disable-bias-linear --untie-embeddings-and-output-weights \
    --attention-dropout 0 --hidden-dropout 0 \
    --micro-batch-size 4 --global-batch-size 512 --train-tokens 20000000000 \
    --lr 4e-4 --min-lr 4e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 \
    --log-interval 10 --eval-interval 2000 --eval-iters 1 \
    --save checkpoints/llama_1b_tp2_pp2 --load checkpoints/llama_1b_tp2_pp2 --save-interval 1000 \
    --tensorboard-dir runs/llama_1b_tp2_pp2 "$@"
