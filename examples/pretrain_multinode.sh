#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous: run this same script on every node.
#   NNODES=4 MASTER_ADDR=node0.cluster MASTER_PORT=29500 bash examples/pretrain_multinode.sh
# Layout for 4 nodes x 8 GPUs = 32 ranks: tensor-parallel 4 stays inside a node (its all-reduces
# need NVLink), pipeline-parallel 2 crosses nodes (point to point, activations only), and
# data-parallel 4 with the distributed optimizer. An 8B Llama-3-shaped model.
# Check the memory first: python tools/parallel_plan.py <the same flags> --world-size 32
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:?set NNODES to the number of nodes}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA=${DATA:-data/corpus_text_document}
TOKENIZER=${TOKENIZER:-tokenizer/tokenizer.json}
torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megalm}" \
    pretrain_gpt.py \
    --tensor-model-parallel-size 4 --sequence-parallel --pipeline-model-parallel-size 2 \
    --use-distributed-optimizer \
    --data-path "$DATA" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 \
    --ffn-hidden-size 14336 --seq-length 8192 --rotary-base 500000 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 \
    --recompute-granularity selective \
    --micro-batch-size 1 --global-batch-size 256 --train-iters 50000 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
    --log-interval 10 --eval-interval 1000 --eval-iters 2 \
    --save checkpoints/llama_8b --load checkpoints/llama_8b --save-interval 500 \
    --tensorboard-dir runs/llama_8b "$@"
