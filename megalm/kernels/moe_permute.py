"""Token permutation for a mixture of experts: to expert-contiguous rows and back.

Routing gives every token t its experts `indices[t, j]` (j < k). `expert_rows` turns them into a
destination row `rows[t, j]` per assignment (torch ops: a stable sort by expert), so that the rows
of expert e are contiguous and experts follow each other in order, as the grouped GEMM wants:

- dropless (no capacity): every assignment gets a row, `num_rows = t x k`;
- with a capacity C per expert, an expert keeps its C assignments with the highest routing
  probability and the others get row -1 (dropped); the kept rows are packed, or, with `pad`,
  expert e owns rows [e C, (e + 1) C) whether it fills them or not (fixed shapes).

Then, for x [t, h] and the experts' output y [num_rows, h]:

    permute(x)[rows[t, j]] = x[t]                       (rows nobody fills are zero)
    unpermute(y, weights)[t] = sum_j weights[t, j] * y[rows[t, j]]   (dropped assignments add 0)

Their gradients are each other: d permute is an unweighted unpermute, d unpermute scatters
weights x dout and takes d weights[t, j] = <dout[t], y[rows[t, j]]>. Both fast paths (Triton, and
CUDA in csrc/cuda/moe_permute_kernels.cu) are the same two kernels, one program / block per token:
a scatter (x -> rows, optionally weighted, optionally with the d weights dot products) and a
gather (rows -> x, optionally weighted), accumulating in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megalm.kernels import _cuda, dispatch


@dataclass
class ExpertRows:
    rows: Tensor  # [t, k] int64 destination row of each assignment, -1 where dropped
    tokens_per_expert: Tensor  # [E] int64 rows of each expert (kept assignments, or C when padded)
    num_rows: int  # rows of the permuted tensor
    dropless: bool  # every assignment has a row and every row is filled
    dropped: Optional[Tensor] = None  # scalar int64: assignments dropped (capacity only)


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Megatron's capacity: ceil(tokens x k / experts x factor)."""
    return max(1, math.ceil(num_tokens * topk / num_experts * capacity_factor))


def expert_rows(indices: Tensor, num_experts: int, probs: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None, pad: bool = False) -> ExpertRows:
    """Destination rows for the assignments `indices` [t, k]; `probs` [t, k] ranks them for dropping."""
    t, k = indices.shape
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    if capacity_factor is None:
        order = torch.argsort(flat, stable=True)
        rows = torch.empty_like(order)
        rows[order] = torch.arange(order.numel(), device=flat.device)
        return ExpertRows(rows.view(t, k), counts, t * k, True)
    capacity = expert_capacity(t, k, num_experts, capacity_factor)
    # Sort by expert, and within an expert by probability, highest first.
    by_prob = torch.argsort(probs.reshape(-1).float(), descending=True, stable=True)
    order = by_prob[torch.argsort(flat[by_prob], stable=True)]
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    experts_sorted = flat[order]
    position = torch.arange(order.numel(), device=flat.device) - starts[experts_sorted]
    keep = position < capacity
    kept = counts.clamp(max=capacity)
    if pad:
        dest = experts_sorted * capacity + position
        tokens, num_rows = torch.full_like(counts, capacity), num_experts * capacity
    else:
        dest = (torch.cumsum(kept, 0) - kept)[experts_sorted] + position
        tokens, num_rows = kept, int(kept.sum())
    rows = torch.full_like(order, -1)
    rows[order] = torch.where(keep, dest, -1)
    return ExpertRows(rows.view(t, k), tokens, num_rows, False, (counts - kept).sum())


# -- references

def permute_reference(x: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """x [t, h] -> [num_rows, h] with out[rows[t, j]] = x[t]."""
    k = rows.shape[1]
    flat = rows.reshape(-1)
    keep = flat >= 0
    source = x.repeat_interleave(k, dim=0)[keep]
    return x.new_zeros(num_rows, x.shape[1]).index_copy(0, flat[keep], source)


def unpermute_reference(y: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """y [num_rows, h], rows / weights [t, k] -> [t, h] = sum_j weights[t, j] y[rows[t, j]] (fp32 sum)."""
    t, k = rows.shape
    flat = rows.reshape(-1)
    keep = flat >= 0
    picked = y.index_select(0, flat.clamp(min=0)).float()
    scale = (weights.reshape(-1).float() * keep)[:, None]
    return (picked * scale).view(t, k, -1).sum(1).to(y.dtype)


# -- fast paths: two kernels, Triton or CUDA

def _scatter_impl(impl, x, rows, weights, num_rows, zero_fill, y):
    if impl == "cuda":
        _cuda.extension()
        return tuple(torch.ops.megalm_moe.permute_scatter(x, rows, weights, num_rows, zero_fill, y))
    from megalm.kernels._triton.moe_permute import scatter
    return scatter(x, rows, weights, num_rows, zero_fill, y)


def _gather_impl(impl, y, rows, weights):
    if impl == "cuda":
        _cuda.extension()
        return torch.ops.megalm_moe.permute_gather(y, rows, weights)
    from megalm.kernels._triton.moe_permute import gather
    return gather(y, rows, weights)


@torch.library.custom_op("megalm::moe_scatter", mutates_args=())
def _scatter(impl: str, x: Tensor, rows: Tensor, weights: Optional[Tensor], num_rows: int, zero_fill: bool,
             y: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """out[rows[t, j]] = (weights[t, j] *) x[t]; with y also dw[t, j] = <x[t], y[rows[t, j]]> (else empty)."""
    return _scatter_impl(impl, x, rows, weights, num_rows, zero_fill, y)


@_scatter.register_fake
def _(impl, x, rows, weights, num_rows, zero_fill, y):
    dw = x.new_empty(rows.shape if y is not None else (0,), dtype=torch.float32)
    return x.new_empty(num_rows, x.shape[1]), dw


@torch.library.custom_op("megalm::moe_gather", mutates_args=())
def _gather(impl: str, y: Tensor, rows: Tensor, weights: Optional[Tensor]) -> Tensor:
    """out[t] = sum_j (weights[t, j] *) y[rows[t, j]]."""
    return _gather_impl(impl, y, rows, weights)


@_gather.register_fake
def _(impl, y, rows, weights):
    return y.new_empty(rows.shape[0], y.shape[1])


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, num_rows, zero_fill, impl):
        ctx.save_for_backward(rows)
        ctx.impl = impl
        out, _ = _scatter(impl, x.contiguous(), rows, None, num_rows, zero_fill, None)
        return out

    @staticmethod
    def backward(ctx, dout):
        (rows,) = ctx.saved_tensors
        return _gather(ctx.impl, dout.contiguous(), rows, None), None, None, None, None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, rows, weights, zero_fill, impl):
        y, weights = y.contiguous(), weights.float().contiguous()
        ctx.save_for_backward(y, rows, weights)
        ctx.impl, ctx.zero_fill, ctx.weights_dtype = impl, zero_fill, weights.dtype
        return _gather(impl, y, rows, weights)

    @staticmethod
    def backward(ctx, dout):
        y, rows, weights = ctx.saved_tensors
        dy, dw = _scatter(ctx.impl, dout.contiguous(), rows, weights, y.shape[0], ctx.zero_fill, y)
        return dy, None, dw, None, None


def _unsupported(x: Tensor, rows: Tensor):
    def check(name: str) -> Optional[str]:
        if name == "cuda":
            if x.device.type != "cuda":
                return f"the CUDA kernels need CUDA tensors, got {x.device.type}"
            if _cuda.extension() is None:
                return _cuda.unavailable_reason()
            if not hasattr(torch.ops.megalm_moe, "permute_scatter"):
                return "megalm._cuda_kernels was built without csrc/cuda/moe_bindings.cpp"
        else:
            reason = dispatch.triton_unsupported_device(x, rows)
            if reason is not None:
                return reason
        if x.dim() != 2 or rows.dim() != 2:
            return f"expected 2-D x and rows, got {tuple(x.shape)} and {tuple(rows.shape)}"
        if x.dtype not in dispatch.FLOAT_DTYPES:
            return f"unsupported dtype {x.dtype}"
        if x.numel() == 0:
            return "empty input"
        return None
    return check


def permute(x: Tensor, routing: ExpertRows, backend: str = "auto") -> Tensor:
    """x [t, h] -> [routing.num_rows, h], expert-contiguous; backend auto|triton|cuda|reference."""
    impl = dispatch.select("moe_permute", backend, x.device, ("triton", "cuda"), _unsupported(x, routing.rows))
    if impl == "reference":
        return permute_reference(x, routing.rows, routing.num_rows)
    return PermuteFunction.apply(x, routing.rows, routing.num_rows, not routing.dropless, impl)


def unpermute(y: Tensor, routing: ExpertRows, weights: Tensor, backend: str = "auto") -> Tensor:
    """y [routing.num_rows, h], weights [t, k] -> [t, h], the weighted sum of each token's expert outputs."""
    impl = dispatch.select("moe_permute", backend, y.device, ("triton", "cuda"), _unsupported(y, routing.rows))
    if impl == "reference":
        return unpermute_reference(y, routing.rows, weights)
    return UnpermuteFunction.apply(y, routing.rows, weights, not routing.dropless, impl)
