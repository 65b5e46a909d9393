"""Triton token scatter / gather for MoE permutation (see megalm.kernels.moe_permute).

scatter: one program per token; for each of its k assignments, the token's row (times the routing
weight) goes to its destination row, and with Y given the program also takes dw = <x[t], Y[row]>.
gather: grid (token, column block); the k source rows are summed (times the weights) in fp32.
A row of -1 (a dropped assignment) is masked out everywhere.
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2, triton_interpreting


@triton.jit
def _scatter_kernel(X, ROWS, WEIGHTS, OUT, Y, DW, H, TOPK: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                    COMPUTE_DW: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(TOPK):
        row = tl.load(ROWS + token * TOPK + j)
        valid = row >= 0
        safe_row = tl.where(valid, row, 0)
        limit = tl.where(valid, H, 0)  # columns to write: none for a dropped assignment
        if HAS_WEIGHTS:
            w = tl.load(WEIGHTS + token * TOPK + j)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            mask = cols < H
            x = tl.load(X + token * H + cols, mask=mask, other=0.0).to(tl.float32)
            value = x
            if HAS_WEIGHTS:
                value = x * w
            tl.store(OUT + safe_row * H + cols, value.to(OUT.dtype.element_ty), mask=cols < limit)
            if COMPUTE_DW:
                y = tl.load(Y + safe_row * H + cols, mask=cols < limit, other=0.0).to(tl.float32)
                acc += x * y
        if COMPUTE_DW:
            tl.store(DW + token * TOPK + j, tl.sum(acc, axis=0))


@triton.jit
def _gather_kernel(Y, ROWS, WEIGHTS, OUT, H, TOPK: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(ROWS + token * TOPK + j)
        valid = row >= 0
        limit = tl.where(valid, H, 0)
        y = tl.load(Y + tl.where(valid, row, 0) * H + cols, mask=cols < limit, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y = y * tl.load(WEIGHTS + token * TOPK + j)
        acc += y
    tl.store(OUT + token * H + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def _block(h: int) -> int:
    return min(next_power_of_2(h), 128 if triton_interpreting() else 1024)


def scatter(x, rows, weights, num_rows: int, zero_fill: bool, y):
    t, h = x.shape
    topk = rows.shape[1]
    out = (torch.zeros if zero_fill else torch.empty)(num_rows, h, dtype=x.dtype, device=x.device)
    dw = torch.empty(rows.shape if y is not None else (0,), dtype=torch.float32, device=x.device)
    if t:
        _scatter_kernel[(t,)](x, rows, weights if weights is not None else x, out, y if y is not None else x, dw, h,
                              TOPK=topk, HAS_WEIGHTS=weights is not None, COMPUTE_DW=y is not None,
                              BLOCK_H=_block(h), num_warps=4)
    return out, dw


def gather(y, rows, weights):
    t, topk = rows.shape
    h = y.shape[1]
    out = torch.empty(t, h, dtype=y.dtype, device=y.device)
    block = _block(h)
    if t:
        _gather_kernel[(t, triton.cdiv(h, block))](y, rows, weights if weights is not None else y, out, h,
                                                   TOPK=topk, HAS_WEIGHTS=weights is not None, BLOCK_H=block,
                                                   num_warps=4)
    return out
