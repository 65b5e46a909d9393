"""Triton SwiGLU forward and backward on a [n, 2f] = [gate | up] input; grid (rows, column blocks).

With s = sigmoid(g):  y = g * s * u,  dy/du = g * s,  dy/dg = u * s * (1 + g * (1 - s)).
The backward pass recomputes s from the saved input instead of storing it.
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2, triton_interpreting


@triton.jit
def _swiglu_forward_kernel(X, Y, stride_x, stride_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DY, X, DX, stride_dy, stride_x, stride_dx, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dy * gate * sig
    tl.store(DX + row * stride_dx + cols, d_gate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + F + cols, d_up.to(DX.dtype.element_ty), mask=mask)


def _block(f: int) -> int:
    return min(next_power_of_2(f), 128 if triton_interpreting() else 1024)


def swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    rows, f = x.shape[0], x.shape[1] // 2
    y = torch.empty(rows, f, dtype=x.dtype, device=x.device)
    block = _block(f)
    _swiglu_forward_kernel[(rows, triton.cdiv(f, block))](x, y, x.stride(0), y.stride(0), f, BLOCK=block,
                                                          num_warps=4)
    return y


def swiglu_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows, f = x.shape[0], x.shape[1] // 2
    dx = torch.empty_like(x)
    block = _block(f)
    _swiglu_backward_kernel[(rows, triton.cdiv(f, block))](dy, x, dx, dy.stride(0), x.stride(0), dx.stride(0), f,
                                                           BLOCK=block, num_warps=4)
    return dx
