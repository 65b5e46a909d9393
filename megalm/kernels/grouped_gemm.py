"""Grouped GEMM: one matmul per expert over that expert's contiguous rows, in one launch.

For x [m, K] whose rows are grouped by expert (`tokens_per_expert` [E] rows each, in order) and
weights w [E, N, K] (`torch.nn.Linear` layout per expert, as Hugging Face's fused experts store
them):

    y[rows of e] = x[rows of e] @ w[e]^T                 -> y [m, N]
    dx[rows of e] = dy[rows of e] @ w[e]                 (the same kernel, w read transposed)
    dw[e] = dy[rows of e]^T @ x[rows of e]               (zero for an expert without rows)

The Triton path maps its programs to (expert, m-tile, n-tile) from a small tile table built with
torch ops on the device (no host sync): the tile counts of the experts are cumsum-ed and every
program looks its expert and first row up by index. The grid is sized for the worst case
(ceil(m / BLOCK_M) + E tiles); programs past the real tile count exit at once. The weight
gradient runs one program per (expert, n-tile, k-tile) looping over the expert's rows. Products
accumulate in fp32 (`tl.dot`, TF32 for fp32 inputs on a GPU).

The reference splits the rows with `torch.split` and loops over the experts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megalm.kernels import dispatch


def grouped_gemm_reference(x: Tensor, w: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """x [m, K], w [E, N, K], tokens_per_expert [E] -> [m, N]."""
    pieces = torch.split(x, tokens_per_expert.tolist())
    if not pieces:
        return x.new_empty(0, w.shape[1])
    return torch.cat([piece @ w[e].t() for e, piece in enumerate(pieces)])


@torch.library.custom_op("megalm::grouped_gemm", mutates_args=())
def _grouped_gemm(x: Tensor, w: Tensor, tokens_per_expert: Tensor, transpose_w: bool) -> Tensor:
    """x @ w[e]^T per group (transpose_w False) or x @ w[e] (True)."""
    from megalm.kernels._triton.grouped_gemm import grouped_gemm
    return grouped_gemm(x, w, tokens_per_expert, transpose_w)


@_grouped_gemm.register_fake
def _(x, w, tokens_per_expert, transpose_w):
    return x.new_empty(x.shape[0], w.shape[2] if transpose_w else w.shape[1])


@torch.library.custom_op("megalm::grouped_gemm_weight_grad", mutates_args=())
def _grouped_gemm_weight_grad(dy: Tensor, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """dw [E, N, K] with dw[e] = dy[rows of e]^T @ x[rows of e]."""
    from megalm.kernels._triton.grouped_gemm import grouped_gemm_weight_grad
    return grouped_gemm_weight_grad(dy, x, tokens_per_expert)


@_grouped_gemm_weight_grad.register_fake
def _(dy, x, tokens_per_expert):
    return dy.new_empty(tokens_per_expert.shape[0], dy.shape[1], x.shape[1])


class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, tokens_per_expert):
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, tokens_per_expert)
        return _grouped_gemm(x, w, tokens_per_expert, False)

    @staticmethod
    def backward(ctx, dy):
        x, w, tokens_per_expert = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _grouped_gemm(dy, w, tokens_per_expert, True) if ctx.needs_input_grad[0] else None
        dw = _grouped_gemm_weight_grad(dy, x, tokens_per_expert) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _unsupported(x: Tensor, w: Tensor):
    def check(name: str) -> Optional[str]:
        reason = dispatch.triton_unsupported_device(x, w)
        if reason is not None:
            return reason
        if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
            return f"expected x [m, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        if x.dtype not in dispatch.FLOAT_DTYPES or w.dtype != x.dtype:
            return f"x and w must share a float dtype, got {x.dtype} and {w.dtype}"
        if x.shape[0] == 0:
            return "no rows"
        return None
    return check


def grouped_gemm(x: Tensor, w: Tensor, tokens_per_expert: Tensor, backend: str = "auto") -> Tensor:
    """x [m, K] (rows grouped by expert), w [E, N, K], tokens_per_expert [E] (sums to m) -> [m, N]."""
    impl = dispatch.select("grouped_gemm", backend, x.device, ("triton",), _unsupported(x, w))
    if impl == "reference":
        return grouped_gemm_reference(x, w, tokens_per_expert)
    return GroupedGemmFunction.apply(x, w, tokens_per_expert)
