#!/usr/bin/env python
"""Plan a parallel layout before booking a cluster: memory per GPU, pipeline bubble, communication
and an estimated step time.

    python tools/parallel_plan.py --num-layers 16 --hidden-size 2048 --num-attention-heads 32 \\
        --num-query-groups 8 --swiglu --seq-length 4096 --vocab-size 128256 --bf16 \\
        --micro-batch-size 1 --global-batch-size 256 --world-size 8 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer

    python tools/parallel_plan.py ... --world-size 64 --search     # every layout, fastest first

Takes the training flags of pretrain_gpt.py (the same parser) plus the cluster's shape. The
formulas, documented in docs/PARALLELISM.md, follow megalm's own memory layout:

- weights 4 bytes per parameter (fp32; bf16 / fp16 run under autocast), gradients 4, AdamW moments
  8 (Lion 4), sharded over DP as --data-parallel-sharding-strategy says (`model_state_bytes`:
  ZeRO-1 the moments, ZeRO-2 also the gradients, ZeRO-3 also the weights), the moments in host
  memory with --optimizer-cpu-offload;
- activations per layer and micro-batch from Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models"), generalised to grouped-query attention, SwiGLU,
  fp32 activations and flash attention (no s^2 terms), split by TP inside the tensor-parallel
  regions and everywhere with sequence parallelism; selective recompute drops the attention core,
  full recompute keeps only each layer's input (plus one layer recomputed at a time);
- the first pipeline stage holds the activations of min(PP, M) micro-batches (1F1B), times
  1 + (PP - 1) / (PP x VP) with the interleaved schedule; bubble (PP - 1) / (VP x M);
- communication per step and GPU from ring collectives: an all-reduce moves 2 (n - 1) / n of the
  buffer per rank, an all-gather or reduce-scatter (n - 1) / n;
- a mixture-of-experts model counts each layer as what it is: the routed experts split by TP and
  EP (their optimizer moments by DP / EP with the distributed optimizer), the k routed rows of every
  token in the activations, four all-to-alls per MoE layer and micro-batch for expert parallelism;
- step time: the model's FLOPs at --gpu-tflops per GPU, stretched by the bubble, plus the
  communication that compute does not hide (`step_time`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.arguments import parse_args  # noqa: E402
from megalm.config import SHARDING_STRATEGIES, Config, ConfigError, pad_vocab_size  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402
from megalm.data.tokenizer import vocabulary_size  # noqa: E402

GB = 2 ** 30


@dataclass
class Cluster:
    world_size: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    intra_node_gb_per_s: float = 300.0  # per GPU, one direction (NVLink 4 on H100: ~450)
    inter_node_gb_per_s: float = 25.0  # per GPU (a 200 Gb/s NIC per GPU)
    gpu_tflops: float = 400.0  # dense FLOP/s one GPU achieves in training (H100 bf16: ~40% of 989 peak)


def _mlp_parameters(h: int, f: int, swiglu: bool, bias: bool) -> tuple:
    """(split by TP, replicated) parameters of a dense MLP of hidden size f."""
    return h * f * (3 if swiglu else 2) + ((2 * f if swiglu else f) if bias else 0), (h if bias else 0)


def layer_parameters(c: Config, moe: bool = False) -> dict:
    """Parameters of one transformer layer: split by TP ("sharded"), replicated (norms, row biases,
    the router), and the routed experts of an MoE layer ("expert", split by TP and by EP)."""
    m = c.model
    d, nq, g, h = m.head_dim, m.num_attention_heads, m.query_groups, m.hidden_size
    bias = m.add_bias_linear
    sharded = h * (nq + 2 * g) * d + nq * d * h + ((nq + 2 * g) * d if bias or m.add_qkv_bias else 0)
    replicated = 2 * h * (2 if m.normalization == "LayerNorm" else 1) + (h if bias else 0)
    expert = 0
    if moe:
        replicated += m.num_experts * (h + (1 if m.moe_router_enable_expert_bias else 0))  # router (+ bias)
        expert = m.num_experts * 3 * h * m.moe_ffn_size  # SwiGLU experts, no biases
        if m.moe_shared_expert_intermediate_size:
            split, rep = _mlp_parameters(h, m.moe_shared_expert_intermediate_size, True, bias)
            sharded, replicated = sharded + split, replicated + rep + (h if m.moe_shared_expert_gate else 0)
    else:
        split, rep = _mlp_parameters(h, m.ffn_size, m.swiglu, bias)
        sharded, replicated = sharded + split, replicated + rep
    return {"sharded": sharded, "replicated": replicated, "expert": expert}


def stage_layers(c: Config, first: bool) -> list:
    """Global indices of the layers of the first (or the last) pipeline rank, every virtual chunk."""
    pp, vp = c.parallel.pipeline_model_parallel_size, c.virtual_pipeline_model_parallel_size
    per = c.model.num_layers // (pp * vp)
    rank = 0 if first else pp - 1
    return [i for v in range(vp) for i in range((v * pp + rank) * per, (v * pp + rank + 1) * per)]


def stage_parameter_split(c: Config, vocab: int, first: bool, last: bool) -> dict:
    """Parameters held by one GPU of a pipeline stage: {"dense": its TP shard of everything but
    the routed experts, "expert": its TP and EP shard of the routed experts}."""
    m, p = c.model, c.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    n = experts = 0.0
    for i in stage_layers(c, first or not last):
        per_layer = layer_parameters(c, m.is_moe_layer(i))
        n += per_layer["sharded"] / tp + per_layer["replicated"]
        experts += per_layer["expert"] / (tp * ep)
    embedding = vocab * m.hidden_size / tp
    if first:
        n += embedding + (m.max_positions * m.hidden_size if m.position_embedding_type == "learned_absolute" else 0)
    if last:
        n += m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
        if m.untie_embeddings_and_output_weights or (pp > 1 and not first):
            n += embedding
    return {"dense": n, "expert": experts}


def stage_parameters(c: Config, vocab: int, first: bool, last: bool) -> float:
    """Parameters held by one GPU of a pipeline stage (its TP shard, and EP shard of the experts)."""
    return sum(stage_parameter_split(c, vocab, first, last).values())


def activation_bytes_per_layer(c: Config, micro_batch_size: int, act_bytes: int, flash: bool = True,
                               moe: bool = False) -> float:
    """Bytes one layer keeps for the backward pass of one micro-batch (Korthikanti et al. 2022, Sec. 4);
    `moe`: an MoE layer, whose MLP activations are those of its routed rows and shared experts."""
    m, p = c.model, c.parallel
    s, b, h, f = m.seq_length, micro_batch_size, m.hidden_size, m.ffn_size
    d, nq, g = m.head_dim, m.num_attention_heads, m.query_groups
    tp = p.tensor_model_parallel_size
    sp = p.sequence_parallel and tp > 1
    mask = 1 if m.hidden_dropout > 0 else 0
    attn_mask = 1 if m.attention_dropout > 0 else 0
    sbh = s * b * h
    # Replicated along TP without SP: the two norms' inputs, the inputs of qkv and fc1, two dropout masks.
    replicated = sbh * (4 * act_bytes + 2 * mask)
    # Inside the TP regions (split by TP): q, k, v; the proj input; the MLP's inner activations.
    qkv = s * b * (nq + 2 * g) * d * act_bytes
    if m.position_embedding_type == "rope":  # the rotated q and k are new tensors
        qkv += s * b * (nq + g) * d * act_bytes
    proj_in = s * b * nq * d * act_bytes
    mlp_inner = s * b * f * act_bytes * (3 if m.swiglu else 2)
    moe_replicated = 0.0
    if moe:
        # Every tensor-parallel rank routes all s b tokens: router logits and scores (fp32), the k
        # permuted input rows and the k expert output rows (kept for the combine's backward); the
        # experts' inner tensors [s b k, 3 ffn] are split by TP. With EP the rows a rank keeps are
        # those of its experts: as many as it sent, with a balanced router.
        k, e = m.moe_router_topk, m.num_experts
        moe_replicated = s * b * (8 * e + 2 * k * h * act_bytes)
        mlp_inner = s * b * k * m.moe_ffn_size * act_bytes * 3
        mlp_inner += s * b * (m.moe_shared_expert_intermediate_size or 0) * act_bytes * 3
    core = 0.0  # the attention core: s^2 terms unless flash attention, which keeps its logsumexp
    if flash:
        core = 4 * s * b * nq
    else:
        # softmax output; with dropout also its mask (1 byte) and output
        core = nq * s * s * b * (act_bytes + (1 + act_bytes if attn_mask else 0))
    if p.recompute_granularity == "selective":
        core = 0.0
    split = qkv + proj_in + mlp_inner + core
    if p.recompute_granularity == "full":
        return sbh * act_bytes / (tp if sp else 1)
    return replicated / (tp if sp else 1) + moe_replicated + split / tp


def estimate(c: Config, cluster: Cluster, vocab: int) -> dict:
    """Memory per GPU (worst stage: the first), bubble and communication per step."""
    m, p, t = c.model, c.parallel, c.train
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    if cluster.world_size % (tp * pp):
        raise ConfigError(f"--world-size {cluster.world_size} is not divisible by TP x PP = {tp * pp}")
    dp = cluster.world_size // (tp * pp)
    if dp % ep:
        raise ConfigError(f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp}")
    vp = c.virtual_pipeline_model_parallel_size
    gbs = t.global_batch_size or t.micro_batch_size * dp
    num_micro = gbs // (t.micro_batch_size * dp)
    padded = pad_vocab_size(vocab, m.make_vocab_size_divisible_by, tp)
    act_bytes = 2 if (t.bf16 or t.fp16) else 4
    worst = {}
    for first, last in ((True, pp == 1), (pp == 1, True)):
        split = stage_parameter_split(c, padded, first, last)
        params = split["dense"] + split["expert"]
        state = model_state_bytes(c, split, dp, first)
        weights, grads, optimizer = state["weights"], state["gradients"], state["optimizer"]
        activations = sum(activation_bytes_per_layer(c, t.micro_batch_size, act_bytes, moe=m.is_moe_layer(i))
                          for i in stage_layers(c, first))
        in_flight = min(pp, num_micro) if pp > 1 else 1
        factor = 1 + (pp - 1) / (pp * vp) if vp > 1 else 1
        activations *= in_flight * factor
        # Full recompute: one layer's activations exist again while its backward runs.
        working = _without_recompute(c, t.micro_batch_size, act_bytes) if p.recompute_granularity == "full" else 0.0
        s, b = m.seq_length, t.micro_batch_size
        if last:  # output layer input, and the fp32 gradient of the logits (unfused) or of h and W (fused)
            activations += s * b * m.hidden_size * act_bytes
            fused = m.cross_entropy_fusion == "fused"
            activations += 4 * (s * b * m.hidden_size + padded * m.hidden_size / tp) if fused else 4 * s * b * padded / tp
        total = weights + grads + optimizer + activations + working + state["zero_working"]
        if total >= worst.get("total", -1):
            worst = dict(params=params, weights=weights, gradients=grads, optimizer=optimizer,
                         activations=activations, recompute_working=working, zero_working=state["zero_working"],
                         host_optimizer=state["host_optimizer"], total=total, stage="first" if first else "last")
    compute = model_flops_per_token(c, padded) * gbs * m.seq_length / (cluster.world_size * cluster.gpu_tflops * 1e12)
    if p.recompute_granularity == "full":
        compute *= 4 / 3  # the forward runs twice: 4 matmul passes instead of 3
    plan = dict(worst, tp=tp, pp=pp, dp=dp, vp=vp, ep=ep, num_microbatches=num_micro, zero=zero_stage(c),
                bubble=(pp - 1) / (vp * num_micro), compute_seconds=compute, tokens_per_step=gbs * m.seq_length,
                **communication(c, cluster, dp, num_micro, padded, act_bytes))
    return dict(plan, **step_time(plan))


def zero_stage(c: Config) -> int:
    """The ZeRO stage of --data-parallel-sharding-strategy (0: no_shard ... 3: optim_grads_params)."""
    return SHARDING_STRATEGIES[c.parallel.sharding_strategy]


def zero3_units(c: Config, split: dict, first: bool) -> tuple:
    """(parameters outside the transformer layers, of the largest layer) on one GPU of a stage:
    ZeRO-3's units, gathered one at a time."""
    tp, ep = c.parallel.tensor_model_parallel_size, c.parallel.expert_model_parallel_size
    per_layer = [layer_parameters(c, c.model.is_moe_layer(i)) for i in stage_layers(c, first)]
    sizes = [n["sharded"] / tp + n["replicated"] + n["expert"] / (tp * ep) for n in per_layer]
    return split["dense"] + split["expert"] - sum(sizes), max(sizes, default=0.0)


def model_state_bytes(c: Config, split: dict, dp: int, first: bool) -> dict:
    """Weights, gradients and optimizer state of one GPU under the sharding strategy, as megalm lays
    them out (megalm.parallel.data_parallel): fp32 weights (4 bytes per parameter) and gradients (4),
    AdamW moments 8 (Lion 4). ZeRO-1 shards the moments over DP (the experts over DP / EP) and keeps
    the full gradient buffer plus the reduce-scattered shard of it; ZeRO-2 keeps only the shard;
    ZeRO-3 also only its shard of the weights. --optimizer-cpu-offload moves the moments, a master
    copy of the weight shard and of the gradient shard to host memory ("host_optimizer").
    "zero_working": what exists only during the step: ZeRO-2 the full gradients of three buckets
    (one being produced, two being reduced); ZeRO-3 the weights of the units outside the layers and
    of two layers (one running, one prefetched), and the gradients of three layers."""
    p, o = c.parallel, c.optim
    stage, ep = zero_stage(c), p.expert_model_parallel_size
    dense, expert = split["dense"], split["expert"]
    shard = dense / dp + expert / (dp // ep)  # parameters of this rank's shard
    params = dense + expert
    moments = (4 if o.optimizer == "lion" else 8) * (shard if stage else params)
    grads = 4 * (params if stage < 2 else shard) + (4 * shard if stage == 1 and dp > 1 else 0)
    weights = 4 * (shard if stage == 3 else params)
    working = 0.0
    if stage == 2:
        working = 4 * min(params, 3 * p.ddp_bucket_size)
    elif stage == 3:
        root, layer = zero3_units(c, split, first)
        working = 4 * (root + 2 * layer) + 4 * 3 * layer
    host = moments + 8 * shard if p.optimizer_cpu_offload else 0.0
    return {"weights": weights, "gradients": grads, "optimizer": 0.0 if p.optimizer_cpu_offload else moments,
            "host_optimizer": host, "zero_working": working}


def model_flops_per_token(c: Config, padded_vocab: int) -> float:
    """Training FLOPs per token, counted by the model's own formula (`megalm.model.gpt.flops_per_token`,
    which reads only the config, so no model is built)."""
    from megalm.model.gpt import flops_per_token  # loads torch: only once a plan is computed, not for --help
    return flops_per_token(replace(c.model, padded_vocab_size=padded_vocab))


def step_time(plan: dict) -> dict:
    """Estimated seconds per step and tokens per second, from a plan's compute and communication.

    Which communication waits ("exposed") and which hides behind compute:
    - tensor parallelism's all-reduces (all-gathers / reduce-scatters with SP) sit between a layer's
      matmuls, and expert parallelism's all-to-alls between the router and the experts: every byte
      is on the critical path;
    - pipeline parallelism's point-to-point sends are waited for before the next micro-batch; they
      are small, and counted whole;
    - data parallelism reduces the gradient buckets while the last micro-batch's backward runs (2/3
      of its compute); the last bucket (the first layers' gradients) starts only when the backward
      ends, and what does not fit in that window waits too. With the distributed optimizer the
      all-gather of the updated parameters follows the optimizer step and is waited for at once.
      ZeRO-2 and ZeRO-3 reduce-scatter after every micro-batch's backward the same way; ZeRO-3's
      all-gathers of the layers run one layer ahead (prefetch), hidden behind the compute of the
      layer before, except the first layer's of each micro-batch; the rest of the model's gather
      opens the step and waits.
    The bubble idles a stage for `bubble` times its busy time (compute plus the TP, EP and PP
    communication of its micro-batches). Not counted: kernel efficiency that changes with the
    layout (smaller matmuls at larger TP) and the output layer's extra work on the last stage.
    """
    busy = plan["compute_seconds"] + plan["tp_seconds"] + plan["ep_seconds"] + plan["pp_seconds"]
    micro = plan["num_microbatches"]
    compute = plan["compute_seconds"] / micro  # one micro-batch's forward and backward
    window = 2 / 3 * compute
    # ZeRO-2/3 reduce after every micro-batch's backward, the others after the last one's.
    reductions = micro if plan["zero"] >= 2 else 1
    reduce = plan["dp_reduce_seconds"] / reductions
    dp_exposed = reductions * max(reduce * plan["last_bucket_fraction"], reduce - window)
    gather = plan["dp_gather_seconds"]
    if plan["zero"] == 3:
        # The rest of the model's gather opens the step; each layer's is prefetched behind the
        # compute of the one before, except the first layer's of every micro-batch.
        root = plan["zero3_root_fraction"]
        ring = gather / (root + 2 * micro * (1 - root)) if gather else 0.0
        layers = 2 * ring * (1 - root)  # one micro-batch's
        gather = ring * root + micro * max(ring * plan["zero3_layer_fraction"], layers - compute)
    dp_exposed += gather
    step = busy * (1 + plan["bubble"]) + dp_exposed
    return {"exposed_seconds": busy - plan["compute_seconds"] + dp_exposed, "step_seconds": step,
            "tokens_per_second": plan["tokens_per_step"] / step}


def ranked(plans: list, cluster: Cluster) -> list:
    """The plans that fit in memory, fastest first, then those that do not. Fastest = most tokens
    per second: the shortest step for a fixed --global-batch-size, and still fair without one
    (then a step holds micro-batch x DP sequences, which differs between layouts)."""
    return sorted(plans, key=lambda e: (not fits(e, cluster), -e["tokens_per_second"]))


def fits(plan: dict, cluster: Cluster) -> bool:
    return plan["total"] <= cluster.gpu_memory_gb * GB


def _without_recompute(c: Config, micro_batch_size: int, act_bytes: int) -> float:
    granularity = c.parallel.recompute_granularity
    c.parallel.recompute_granularity = None
    try:
        return activation_bytes_per_layer(c, micro_batch_size, act_bytes)
    finally:
        c.parallel.recompute_granularity = granularity


def communication(c: Config, cluster: Cluster, dp: int, num_micro: int, padded_vocab: int, act_bytes: int) -> dict:
    """Bytes sent per GPU and step, and the time at the cluster's bandwidths."""
    m, p, t = c.model, c.parallel, c.train
    tp, pp, vp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, c.virtual_pipeline_model_parallel_size
    ep = p.expert_model_parallel_size
    layers = stage_layers(c, True)
    moe_layers = sum(m.is_moe_layer(i) for i in layers)
    activation = m.seq_length * t.micro_batch_size * m.hidden_size * act_bytes
    # Four all-reduces per layer and micro-batch (two forward, two backward; the same volume as
    # SP's all-gather / reduce-scatter pairs), two more with full recompute. An MoE layer's experts
    # all-reduce their k output rows per token forward and the tokens' input gradient backward
    # (k + 1 instead of 2), and its shared experts add the dense MLP's two.
    collectives = 4 + (2 if p.recompute_granularity == "full" else 0)
    moe_extra = (m.moe_router_topk - 1 + (2 if m.moe_shared_expert_intermediate_size else 0)) if m.num_experts else 0
    units = collectives * len(layers) + moe_extra * moe_layers
    tp_bytes = units * num_micro * activation * 2 * (tp - 1) / tp if tp > 1 else 0.0
    # Activations forward and gradients backward, at every stage boundary, VP times per micro-batch.
    pp_bytes = 2 * vp * num_micro * activation / (tp if p.sequence_parallel and tp > 1 else 1) if pp > 1 else 0.0
    # Expert parallelism: per MoE layer and micro-batch, the k rows of every token go out and come
    # back forward, and their gradients backward (four all-to-alls); (EP - 1) / EP of them leave.
    ep_bytes = 4 * moe_layers * num_micro * activation * m.moe_router_topk * (ep - 1) / ep if ep > 1 else 0.0
    split = stage_parameter_split(c, padded_vocab, True, pp == 1)
    dp_reduce, dp_gather = data_parallel_bytes(c, split, dp, num_micro)
    dp_bytes = dp_reduce + dp_gather
    # the share of the gradients in the bucket reduced after the backward pass (all without overlap);
    # ZeRO-3's last unit is the one outside the layers (the embedding's gradient comes last)
    total = split["dense"] + split["expert"]
    bucket = zero3_units(c, split, True)[0] if zero_stage(c) == 3 else p.ddp_bucket_size
    last_bucket = min(1.0, bucket / total) if p.overlap_grad_reduce and total else 1.0
    crosses_nodes = lambda span: span > cluster.gpus_per_node  # noqa: E731
    bandwidth = {"tp": cluster.intra_node_gb_per_s if not crosses_nodes(tp) else cluster.inter_node_gb_per_s,
                 "pp": cluster.inter_node_gb_per_s if crosses_nodes(tp * dp * pp) else cluster.intra_node_gb_per_s,
                 "dp": cluster.inter_node_gb_per_s if crosses_nodes(tp * dp) else cluster.intra_node_gb_per_s,
                 "ep": cluster.inter_node_gb_per_s if crosses_nodes(tp * ep) else cluster.intra_node_gb_per_s}
    return {"tp_bytes": tp_bytes, "pp_bytes": pp_bytes, "dp_bytes": dp_bytes, "ep_bytes": ep_bytes,
            "tp_seconds": tp_bytes / (bandwidth["tp"] * 1e9), "pp_seconds": pp_bytes / (bandwidth["pp"] * 1e9),
            "dp_seconds": dp_bytes / (bandwidth["dp"] * 1e9), "ep_seconds": ep_bytes / (bandwidth["ep"] * 1e9),
            "dp_reduce_bytes": dp_reduce, "dp_gather_bytes": dp_gather,
            "dp_reduce_seconds": dp_reduce / (bandwidth["dp"] * 1e9),
            "dp_gather_seconds": dp_gather / (bandwidth["dp"] * 1e9), "last_bucket_fraction": last_bucket,
            **{f"zero3_{k}_fraction": v / total if total else 1.0
               for k, v in zip(("root", "layer"), zero3_units(c, split, True))}}


def data_parallel_bytes(c: Config, split: dict, dp: int, num_micro: int) -> tuple:
    """(reduction, all-gather) bytes one GPU sends per step over data parallelism; a ring
    reduce-scatter or all-gather of everything moves (n - 1) / n of the 4-byte parameters, an
    all-reduce twice that; the experts over their DP / EP ranks.
    - no_shard: one all-reduce of the gradients; optim (ZeRO-1): their reduce-scatter and the
      all-gather of the updated weights;
    - optim_grads (ZeRO-2): a reduce-scatter after every micro-batch (no local accumulation);
    - optim_grads_params (ZeRO-3): that, and every micro-batch gathers the layers' weights for its
      forward and again for its backward; the rest of the model is gathered once per step."""
    stage, ep = zero_stage(c), c.parallel.expert_model_parallel_size
    edp = dp // ep
    ring = 4 * (split["dense"] * (dp - 1) / dp + split["expert"] * (edp - 1) / edp)
    if stage <= 1:
        return (2 * ring if stage == 0 else ring), (ring if stage == 1 else 0.0)
    if stage == 2:
        return ring * num_micro, ring
    root = zero3_units(c, split, True)[0]
    root_share = root / (split["dense"] + split["expert"]) if split["dense"] + split["expert"] else 1.0
    return ring * num_micro, ring * (root_share + 2 * num_micro * (1 - root_share))


def layouts(c: Config, cluster: Cluster):
    """Every (TP, PP, EP) that divides the world and the model, TP within a node; EP (MoE models
    only) divides the data-parallel size and the expert count."""
    m = c.model
    for tp in (1, 2, 4, 8, 16):
        if tp > cluster.gpus_per_node or m.num_attention_heads % tp or m.query_groups % tp or m.ffn_size % tp:
            continue
        if m.num_experts and m.moe_ffn_size % tp:
            continue
        for pp in range(1, m.num_layers + 1):
            if m.num_layers % pp == 0 and cluster.world_size % (tp * pp) == 0:
                dp = cluster.world_size // (tp * pp)
                for ep in range(1, dp + 1):
                    if ep == 1 or (m.num_experts and dp % ep == 0 and m.num_experts % ep == 0):
                        yield tp, pp, ep


def _row(e: dict, cluster: Cluster) -> str:
    comm = e["tp_seconds"] + e["pp_seconds"] + e["dp_seconds"] + e["ep_seconds"]
    return (f"{e['tp']:>3} {e['pp']:>3} {e['dp']:>4} {e['vp']:>3} {e['ep']:>3} {e['zero']:>4} | {e['weights'] / GB:7.2f} "
            f"{e['gradients'] / GB:7.2f} {e['optimizer'] / GB:7.2f} {e['activations'] / GB:7.2f} "
            f"{e['total'] / GB:7.2f} {'yes' if fits(e, cluster) else 'NO':>4} | {100 * e['bubble']:5.1f}% | "
            f"{comm:8.3g} {e['exposed_seconds']:8.3g} | {e['step_seconds']:8.3g} {e['tokens_per_second']:11,.0f}")


HEADER = (" TP  PP   DP  VP  EP ZeRO | weights   grads   optim  activ.   total fits | bubble | "
          "  comm s  exposed |   step s    tokens/s\n" + "-" * 122)


def layout_flags(plan: dict, moe: bool) -> str:
    """The pretrain_gpt.py flags that choose this plan's layout."""
    flags = f"--tensor-model-parallel-size {plan['tp']} --pipeline-model-parallel-size {plan['pp']}"
    flags += f" --expert-model-parallel-size {plan['ep']}" if moe else ""
    strategy = next(name for name, stage in SHARDING_STRATEGIES.items() if stage == plan["zero"])
    return flags + f" --data-parallel-sharding-strategy {strategy}"


def sharding_strategies(c: Config, world_size: int, search: bool) -> list:
    """The strategies to plan: when searching every one the layout allows (ZeRO-3 not with pipeline
    parallelism; only the first without data parallelism), else the one given."""
    p = c.parallel
    if not search:
        return [p.sharding_strategy]
    zero3 = p.pipeline_model_parallel_size == 1 and not c.train.compile
    found = [s for s in SHARDING_STRATEGIES if (s != "no_shard" or not p.optimizer_cpu_offload)
             and (s != "optim_grads_params" or zero3)]
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    return found[:1] if dp == 1 else found


def planned_vocabulary_size(data) -> int:
    """The tokenizer's vocabulary size, as training finds it (megalm.data.tokenizer.vocabulary_size)."""
    size = vocabulary_size(data)
    if not size:
        raise ConfigError("the planner needs the vocabulary: give --vocab-size N (the tokenizer's vocabulary "
                          "size, e.g. 128256 for Llama 3), or --tokenizer-type with --tokenizer-model "
                          "(or --vocab-file and --merge-file) to read it from the tokenizer")
    return size


DESCRIPTION = """\
Plan a parallel layout before booking a cluster: memory per GPU, pipeline bubble, communication
and an estimated step time (estimates, not measurements).

Every pretrain_gpt.py flag is accepted and describes the model and the batch (--num-layers,
--hidden-size, --seq-length, --micro-batch-size, --global-batch-size, --bf16, --recompute-*,
--use-distributed-optimizer, ...); the flags of the planner, first below, describe the cluster.
The vocabulary comes from --vocab-size (the tokenizer's vocabulary size) or from the tokenizer
itself: --tokenizer-type with --tokenizer-model (or --vocab-file and --merge-file)."""

EPILOG = """\
examples:
  %(prog)s --num-layers 16 --hidden-size 2048 --num-attention-heads 32 --num-query-groups 8 \\
      --swiglu --seq-length 4096 --vocab-size 128256 --bf16 --micro-batch-size 1 \\
      --global-batch-size 256 --world-size 8 --tensor-model-parallel-size 2
  %(prog)s ... --world-size 64 --search     # every layout, fastest first, and the flags of the best

formulas: docs/PARALLELISM.md (Planning)"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs; each help text states its own default, as the training
    flags' do."""


def _planner_flags(parser) -> None:
    parser.prog = "tools/parallel_plan.py"
    parser.usage = "%(prog)s [planner flags] [pretrain_gpt.py flags describing the model]"
    parser.epilog = EPILOG
    parser.formatter_class = _HelpFormatter
    group = parser.add_argument_group("planner: the cluster")
    group.add_argument("--world-size", type=int, metavar="N", default=8, help="GPUs in the job. (default: 8)")
    group.add_argument("--gpus-per-node", type=int, metavar="N", default=8, help="GPUs per node. (default: 8)")
    group.add_argument("--gpu-memory-gb", type=float, metavar="X", default=80.0, help="Memory of one GPU, GiB. (default: 80)")
    group.add_argument("--intra-node-gb-per-s", type=float, metavar="X", default=300.0,
                       help="NVLink bandwidth per GPU, GB/s. (default: 300)")
    group.add_argument("--inter-node-gb-per-s", type=float, metavar="X", default=25.0,
                       help="Network bandwidth per GPU, GB/s. (default: 25)")
    group.add_argument("--gpu-tflops", type=float, metavar="X", default=400.0,
                       help="Dense TFLOP/s one GPU achieves in training, not its peak (H100 bf16: ~400 of "
                            "989; A100 bf16: ~150 of 312; give your own for fp32); sets the step time. (default: 400)")
    group.add_argument("--search", action="store_true",
                       help="Try every TP x PP (x EP for an MoE model) layout for --world-size, rank them by "
                            "estimated step time and print the flags of the fastest that fits.")
    # argparse prints groups in the order they were added; the planner's own come right after -h,
    # before the ~330 training flags.
    parser._action_groups.remove(group)
    parser._action_groups.insert(parser._action_groups.index(parser._optionals) + 1, group)


def main(argv=None) -> int:
    try:
        config, ns = parse_args(argv, extra=_planner_flags, description=DESCRIPTION)
        vocab = planned_vocabulary_size(config.data)
        cluster = Cluster(ns.world_size, ns.gpus_per_node, ns.gpu_memory_gb, ns.intra_node_gb_per_s,
                          ns.inter_node_gb_per_s, ns.gpu_tflops)
        par = config.parallel
        candidates = list(layouts(config, cluster)) if ns.search else \
            [(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size)]
        plans, rejected, reasons = [], [], {}
        for tp, pp, ep in candidates:
            par.tensor_model_parallel_size, par.pipeline_model_parallel_size = tp, pp
            par.expert_model_parallel_size = ep
            if ns.search:  # every strategy is tried below; validate the layout with ZeRO-1's
                par.num_layers_per_virtual_pipeline_stage = None
                par.data_parallel_sharding_strategy, par.use_distributed_optimizer = "optim", False
            try:
                config.validate_layout()
                for strategy in sharding_strategies(config, cluster.world_size, ns.search):
                    par.data_parallel_sharding_strategy, par.use_distributed_optimizer = strategy, False
                    plans.append(estimate(config, cluster, vocab))
            except ConfigError as e:
                if not ns.search:
                    raise
                rejected.append(f"{tp:>3} {pp:>3}   -- EP {ep}: {e}")
                reasons[str(e)] = None
        print(f"estimates, not measurements: {cluster.world_size} GPUs of {cluster.gpu_memory_gb:g} GiB at "
              f"{cluster.gpu_tflops:g} TFLOP/s each (--gpu-tflops)" + ("; fastest first" if ns.search else ""))
        print("memory per GPU in GiB (the fullest pipeline stage); communication per step and GPU in seconds "
              "(all of it, and the part compute does not hide)")
        if ns.search and not config.train.global_batch_size:
            print("no --global-batch-size: a step holds --micro-batch-size x DP sequences, so compare tokens/s")
        print(HEADER)
        plans = ranked(plans, cluster)
        for plan in plans:
            print(_row(plan, cluster))
        for line in rejected:
            print(line)
        if par.optimizer_cpu_offload:
            print(f"--optimizer-cpu-offload: the optimizer state (moments, master weights and gradients of the "
                  f"shard) is in host memory, {plans[0]['host_optimizer'] / GB:.2f} GiB per GPU for the first row")
        if ns.search:
            if not plans:
                raise ConfigError(f"no layout of {cluster.world_size} GPUs can run this model: " + "; ".join(reasons))
            best = next((e for e in plans if fits(e, cluster)), None)
            if best is None:
                raise ConfigError(f"no layout of {cluster.world_size} GPUs fits in {cluster.gpu_memory_gb:g} GiB "
                                  f"per GPU; save memory (--recompute-granularity selective or full, "
                                  f"--optimizer-cpu-offload, --sequence-parallel, a smaller "
                                  f"--micro-batch-size) or add GPUs (--world-size)")
            print("recommended: " + layout_flags(best, bool(config.model.num_experts)))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
