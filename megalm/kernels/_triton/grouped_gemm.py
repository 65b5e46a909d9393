"""Triton grouped GEMM over experts (see megalm.kernels.grouped_gemm for the math).

The tile table lives in device memory as plain int32 tensors indexed by program id (the Triton
interpreter cannot follow pointers loaded from memory, and the compiled kernel needs none):
tile_expert[p] (-1 past the last real tile), tile_row_start[p], tile_row_end[p].

On a GPU the rest of the tile (BLOCK_N, BLOCK_K, warps, stages; BLOCK_M too for the weight
gradient) is autotuned per (N, K, dtype) among configs pruned first to the shared memory of the
architecture (`configs.shared_memory_prune`); under TRITON_INTERPRET fixed 16 x 16 x 16 tiles.
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import triton_interpreting
from megalm.kernels._triton.configs import shared_memory_prune, tile_estimate


@triton.jit
def _grouped_gemm_kernel(X, W, Y, TILE_EXPERT, TILE_ROW_START, TILE_ROW_END, N, K,
                         stride_xm, stride_we, stride_bk, stride_bn, stride_ym,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(TILE_EXPERT + pid_m)
    row_start = tl.load(TILE_ROW_START + pid_m)
    row_end = tl.load(TILE_ROW_END + pid_m)  # == row_start for an idle program: everything is masked
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = W + tl.maximum(expert, 0).to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(a, b)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _weight_grad_kernel(DY, X, DW, OFFSETS, N, K, stride_dym, stride_xm, stride_we, stride_wn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < N
    k_mask = ks < K
    start = tl.load(OFFSETS + expert)
    end = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < end
        dy_t = tl.load(DY + rows[None, :] * stride_dym + ns[:, None], mask=n_mask[:, None] & row_mask[None, :],
                       other=0.0)  # [BLOCK_N, BLOCK_M]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        acc += tl.dot(dy_t, x)
    tl.store(DW + expert.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :],
             acc.to(DW.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# The tile table is built on the host for one BLOCK_M, so the autotuners choose the rest of the tile.
FORWARD_BLOCK_M = 128
_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}


def _configs(names, rows):
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


# (BLOCK_N, BLOCK_K, warps, stages): the wide tiles suit the few large experts of Mixtral-like layers,
# the narrow ones the many small experts of DeepSeek-MoE-like layers.
FORWARD_CONFIGS = _configs(("BLOCK_N", "BLOCK_K"), [
    (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3)])
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): BLOCK_M is the reduction over an expert's rows.
WEIGHT_GRAD_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    (64, 128, 128, 8, 3), (32, 128, 128, 4, 4), (64, 64, 64, 4, 3), (64, 128, 256, 8, 3)])

_grouped_gemm_tuned = triton.autotune(
    FORWARD_CONFIGS, key=["N", "K"],
    prune_configs_by={"early_config_prune": shared_memory_prune(
        "grouped_gemm", tile_estimate([("BLOCK_M", "BLOCK_K"), ("BLOCK_K", "BLOCK_N")], [], "X"))},
)(_grouped_gemm_kernel)
_weight_grad_tuned = triton.autotune(
    WEIGHT_GRAD_CONFIGS, key=["N", "K"],
    prune_configs_by={"early_config_prune": shared_memory_prune(
        "grouped_gemm_weight_grad", tile_estimate([("BLOCK_N", "BLOCK_M"), ("BLOCK_M", "BLOCK_K")], [], "X"))},
)(_weight_grad_kernel)


def tile_table(tokens_per_expert: torch.Tensor, num_rows: int, block_m: int):
    """(tile_expert, tile_row_start, tile_row_end) int32 [ceil(rows / block_m) + E], by torch ops."""
    counts = tokens_per_expert.to(torch.int64)
    num_experts = counts.numel()
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    row_offsets = torch.cumsum(counts, 0) - counts
    programs = -(-num_rows // block_m) + num_experts
    pid = torch.arange(programs, device=counts.device)
    expert = torch.searchsorted(tile_end, pid, right=True)
    real = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    local = pid - (tile_end - tiles)[e]
    start = row_offsets[e] + local * block_m
    end = row_offsets[e] + counts[e]
    start = torch.where(real, start, 0)
    end = torch.where(real, end, 0)
    return (torch.where(real, expert, -1).to(torch.int32), start.to(torch.int32), end.to(torch.int32))


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, transpose_w: bool):
    m, k = x.shape
    if transpose_w:  # x @ w[e]: w[e] is [k, n]
        n, stride_bk, stride_bn = w.shape[2], w.stride(1), w.stride(2)
    else:  # x @ w[e]^T: w[e] is [n, k]
        n, stride_bk, stride_bn = w.shape[1], w.stride(2), w.stride(1)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m = _INTERPRETER["BLOCK_M"] if triton_interpreting() else FORWARD_BLOCK_M
    table = tile_table(tokens_per_expert, m, block_m)
    args = (x, w, y, *table, n, k, x.stride(0), w.stride(0), stride_bk, stride_bn, y.stride(0))
    if triton_interpreting():
        _grouped_gemm_kernel[(table[0].numel(), triton.cdiv(n, 16))](*args, **_INTERPRETER)
    else:
        _grouped_gemm_tuned[lambda meta: (table[0].numel(), triton.cdiv(n, meta["BLOCK_N"]))](
            *args, BLOCK_M=block_m)
    return y


def grouped_gemm_weight_grad(dy: torch.Tensor, x: torch.Tensor, tokens_per_expert: torch.Tensor):
    num_experts = tokens_per_expert.numel()
    n, k = dy.shape[1], x.shape[1]
    dw = torch.empty(num_experts, n, k, dtype=x.dtype, device=x.device)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(tokens_per_expert, 0)
    args = (dy, x, dw, offsets, n, k, dy.stride(0), x.stride(0), dw.stride(0), dw.stride(1))
    if triton_interpreting():
        _weight_grad_kernel[(num_experts, triton.cdiv(n, 16), triton.cdiv(k, 16))](*args, **_INTERPRETER)
    else:
        _weight_grad_tuned[lambda meta: (num_experts, triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))](
            *args)
    return dw
