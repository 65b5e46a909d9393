"""Triton top-k router: one program per token, the token's E scores in registers.

Top-k is k rounds of arg-max (k is small), each masking out the expert it picked; ties go to the
lowest expert index. The backward recomputes the scores from the logits (see megalm.kernels.moe_router).
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2


@triton.jit
def _scores(z, mask, SIGMOID: tl.constexpr):
    if SIGMOID:
        s = tl.sigmoid(z)
    else:
        z = tl.where(mask, z, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=0))
        e = tl.where(mask, e, 0.0)
        s = e / tl.sum(e, axis=0)
    return tl.where(mask, s, 0.0)


@triton.jit
def _router_forward_kernel(Z, B, W, IDX, S, E, b_stride, scaling, TOPK: tl.constexpr, SIGMOID: tl.constexpr,
                           NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    z = tl.load(Z + row * E + cols, mask=mask, other=0.0)
    s = _scores(z, mask, SIGMOID)
    tl.store(S + row * E + cols, s, mask=mask)
    # Candidates: the scores, plus the bias when given (it decides the choice only): per expert, or
    # per token and expert (b_stride = E; -inf drops an expert); padding lanes and chosen experts
    # sit at -inf, below every real candidate.
    candidates = s
    if HAS_BIAS:
        candidates = s + tl.load(B + row * b_stride + cols, mask=mask, other=0.0)
    remaining = tl.where(mask, candidates, float("-inf"))
    lanes = tl.arange(0, BLOCK_K)
    gates = tl.zeros([BLOCK_K], dtype=tl.float32)
    picks = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOPK):
        best = tl.max(remaining, axis=0)
        pick = tl.min(tl.where(remaining == best, cols, BLOCK_E), axis=0)
        gate = tl.sum(tl.where(cols == pick, s, 0.0), axis=0)  # the unbiased score
        gates = tl.where(lanes == j, gate, gates)
        picks = tl.where(lanes == j, pick.to(tl.int64), picks)
        remaining = tl.where(cols == pick, float("-inf"), remaining)
    if NORMALIZE:
        gates = gates / tl.sum(gates, axis=0)
    gates = gates * scaling
    tl.store(W + row * TOPK + lanes, gates, mask=lanes < TOPK)
    tl.store(IDX + row * TOPK + lanes, picks, mask=lanes < TOPK)


@triton.jit
def _router_backward_kernel(Z, IDX, DW, DS, DZ, E, scaling, TOPK: tl.constexpr, SIGMOID: tl.constexpr,
                            NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    z = tl.load(Z + row * E + cols, mask=mask, other=0.0)
    s = _scores(z, mask, SIGMOID)
    ds = tl.load(DS + row * E + cols, mask=mask, other=0.0)
    lanes = tl.arange(0, BLOCK_K)
    idx = tl.load(IDX + row * TOPK + lanes, mask=lanes < TOPK, other=-1)  # [k]
    dw = tl.load(DW + row * TOPK + lanes, mask=lanes < TOPK, other=0.0)  # [k]
    # g_j = s[idx_j], gathered by a [k, E] one-hot (k and E are small).
    onehot = idx[:, None] == cols[None, :]
    g = tl.sum(tl.where(onehot, s[None, :], 0.0), axis=1)  # [k]
    if NORMALIZE:
        total = tl.sum(g, axis=0)
        dg = scaling * (dw - tl.sum(dw * g, axis=0) / total) / total
    else:
        dg = scaling * dw
    ds += tl.sum(tl.where(onehot, dg[:, None], 0.0), axis=0)
    if SIGMOID:
        dz = ds * s * (1.0 - s)
    else:
        dz = s * (ds - tl.sum(ds * s, axis=0))
    tl.store(DZ + row * E + cols, dz, mask=mask)


def router_forward(logits: torch.Tensor, topk: int, sigmoid: bool, normalize: bool, scaling: float,
                   bias: torch.Tensor = None):
    t, e = logits.shape
    weights = torch.empty(t, topk, dtype=torch.float32, device=logits.device)
    indices = torch.empty(t, topk, dtype=torch.int64, device=logits.device)
    scores = torch.empty(t, e, dtype=torch.float32, device=logits.device)
    b_stride = e if bias is not None and bias.dim() == 2 else 0
    _router_forward_kernel[(t,)](logits, bias if bias is not None else logits, weights, indices, scores, e, b_stride,
                                 scaling,
                                 TOPK=topk, SIGMOID=sigmoid, NORMALIZE=normalize, HAS_BIAS=bias is not None,
                                 BLOCK_E=next_power_of_2(e), BLOCK_K=next_power_of_2(topk), num_warps=4)
    return weights, indices, scores


def router_backward(logits, indices, d_weights, d_scores, sigmoid: bool, normalize: bool, scaling: float):
    t, e = logits.shape
    topk = indices.shape[1]
    d_logits = torch.empty(t, e, dtype=torch.float32, device=logits.device)
    _router_backward_kernel[(t,)](logits, indices, d_weights, d_scores, d_logits, e, scaling, TOPK=topk,
                                  SIGMOID=sigmoid, NORMALIZE=normalize, BLOCK_E=next_power_of_2(e),
                                  BLOCK_K=next_power_of_2(topk), num_warps=4)
    return d_logits
