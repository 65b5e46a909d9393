"""Triton RMSNorm / LayerNorm, forward and backward; one row of [n, h] per program.

Forward stores the per-row 1/rms (and mean for LayerNorm) in fp32 for the backward pass.
Backward: a fixed grid of programs, each looping over a contiguous run of rows, writes dx per row
and accumulates its rows' weight (and bias) gradient in registers; each program stores its partial
sum in row `pid` of an fp32 [programs, h] buffer, summed afterwards by torch, so no atomics.

Gradients (casts treated as identity), with n = x * rstd:
  RMSNorm    dx = rstd * (dn - n * mean(dn * n)),                 dn = dy * w,  dw = sum dy * n
  LayerNorm  dx = rstd * (dn - (xhat * mean(dn * xhat) + mean(dn))), xhat = (x - mean) * rstd,
             dw = sum dy * xhat, db = sum dy
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2, program_count, row_num_warps


@triton.jit
def _norm_forward_kernel(X, W, B, Y, Mean, Rstd, stride_x, stride_y, N, eps,
                         IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        # HF Llama: normalise in fp32, cast to the activation dtype, then scale by the weight
        # (itself cast to the activation dtype).
        normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
        y = normed * w
    else:
        mean = tl.sum(x, axis=0) / N
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = centred * rstd * w
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(DY, X, W, Mean, Rstd, DX, DW, DB, stride_dy, stride_x, stride_dx, rows, N,
                          rows_per_program, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if IS_RMS:
        w = tl.load(W + cols, mask=mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    else:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    # row pointers advance by their stride (64-bit offsets without casting the loop counter)
    x_row = X + first * stride_x
    dy_row = DY + first * stride_dy
    dx_row = DX + first * stride_dx
    for row in range(first, last):
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
            dn = dy * w
            dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / N))
        else:
            mean = tl.load(Mean + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
            dn = dy * w
            dx = rstd * (dn - (xhat * (tl.sum(dn * xhat, axis=0) / N) + tl.sum(dn, axis=0) / N))
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
        x_row += stride_x
        dy_row += stride_dy
        dx_row += stride_dx
    tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


def norm_forward(x: torch.Tensor, weight: torch.Tensor, bias, eps: float, rms: bool):
    """x [n, h] (last dim contiguous) -> (y [n, h], mean [n] or empty, rstd [n])."""
    rows, n = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if rms else rows, dtype=torch.float32, device=x.device)
    block = next_power_of_2(n)
    _norm_forward_kernel[(rows,)](
        x, weight, bias if bias is not None else weight, y, mean if not rms else rstd, rstd,
        x.stride(0), y.stride(0), n, eps, IS_RMS=rms, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=row_num_warps(block))
    return y, mean, rstd


def norm_backward(dy, x, weight, mean, rstd, rms: bool, has_bias: bool):
    """-> (dx [n, h], dweight [h] fp32, dbias [h] fp32 or empty)."""
    rows, n = x.shape
    dx = torch.empty_like(x)
    programs = program_count(x.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    partial_dw = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    partial_db = torch.empty(programs if has_bias else 0, n, dtype=torch.float32, device=x.device)
    block = next_power_of_2(n)
    _norm_backward_kernel[(programs,)](
        dy, x, weight, mean if not rms else rstd, rstd, dx, partial_dw, partial_db if has_bias else partial_dw,
        dy.stride(0), x.stride(0), dx.stride(0), rows, n, rows_per_program, IS_RMS=rms, HAS_BIAS=has_bias,
        BLOCK=block, num_warps=row_num_warps(block))
    db = partial_db.sum(0) if has_bias else partial_dw.new_empty(0)
    return dx, partial_dw.sum(0), db
