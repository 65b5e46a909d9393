#!/usr/bin/env bash
# A small DeepSeek-MoE-shaped model: fine-grained routed experts plus shared experts, the first
# layer dense. 12 layers, hidden 1024; every MoE layer has 32 routed experts of FFN 704, top-6, and
# 2 shared experts (2 x 704); about 0.97B parameters in total, 0.35B active per token.
#
#   bash examples/pretrain_moe.sh                                     # one process (GPU if present)
#   NPROC=8 EP=4 bash examples/pretrain_moe.sh                        # 8 GPUs: data 8, experts split 4 ways
#   NPROC=8 TP=2 EP=4 bash examples/pretrain_moe.sh                   # tensor 2 x data 4, experts split 4 ways
#   DATA=data/owt_text_document bash examples/pretrain_moe.sh         # real data (GPT-2 tokenizer)
#
# Without DATA it trains on --mock-data. Drop tokens with --moe-expert-capacity-factor 1.25; balance
# without an aux loss (DeepSeek-V3) with --moe-router-enable-expert-bias --moe-aux-loss-coeff 0.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
EP=${EP:-1}
TP=${TP:-1}
if [[ -n "${DATA:-}" ]]; then
    TOKENIZER=${TOKENIZER:-gpt2}
    DATA_FLAGS=(--data-path "$DATA" --split 990,9,1 --tokenizer-type GPT2BPETokenizer
                --vocab-file "$TOKENIZER/vocab.json" --merge-file "$TOKENIZER/merges.txt")
else
    DATA_FLAGS=(--mock-data --vocab-size 50257)
fi
LAUNCH=(python)
PARALLEL=(--expert-model-parallel-size "$EP" --tensor-model-parallel-size "$TP")
if (( TP > 1 )); then
    PARALLEL+=(--sequence-parallel)
fi
if (( NPROC > 1 )); then
    LAUNCH=(torchrun --standalone --nproc-per-node "$NPROC")
fi
"${LAUNCH[@]}" pretrain_gpt.py "${DATA_FLAGS[@]}" \
    --num-layers 12 --hidden-size 1024 --num-attention-heads 16 --seq-length 2048 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --untie-embeddings-and-output-weights --ffn-hidden-size 2816 \
    --attention-dropout 0 --hidden-dropout 0 \
    --num-experts 32 --moe-ffn-hidden-size 704 --moe-router-topk 6 \
    --moe-shared-expert-intermediate-size 1408 --first-k-dense-replace 1 \
    --moe-aux-loss-coeff 1e-3 --moe-z-loss-coeff 1e-4 \
    "${PARALLEL[@]}" \
    --micro-batch-size 4 --global-batch-size 256 --train-iters 20000 \
    --lr 4.2e-4 --min-lr 4.2e-5 --lr-warmup-iters 500 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --log-interval 10 --eval-interval 1000 --eval-iters 2 \
    --tensorboard-dir runs/moe_small "$@"
