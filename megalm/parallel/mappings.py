"""The autograd collectives of tensor and sequence parallelism, all in one place.

Each function is a collective in the forward pass and its conjugate in the backward pass
(Megatron-LM's "mappings"; Shoeybi et al. 2019, Korthikanti et al. 2022):

    forward                             backward              used where
    identity                            all-reduce            input of a column-parallel linear
    all-reduce                          identity              output of a row-parallel linear
    all-gather (last dim)               split                 full logits from vocab shards
    split (last dim)                    all-gather
    split (sequence)                    all-gather            entering the sequence-parallel region
    all-gather (sequence)               reduce-scatter        input of a column-parallel linear (SP)
    all-gather (sequence)               split                 input of a replicated computation (SP: MoE)
    reduce-scatter (sequence)           all-gather            output of a row-parallel linear (SP)

Activations are batch-first [b, s, h]: the sequence dimension is 1. With a group of one rank every
function returns its input untouched, but the layers do not even call them then (TP=1 stays the
plain model, with no autograd nodes added).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1

# torch 2.13 renamed the tensor-in / tensor-out collectives; 2.11 and 2.12 know the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group, async_op: bool = False):
    return dist.all_reduce(x, group=group, async_op=async_op)


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Concatenate every rank's `shard` along dim 0 into `output` (flat buffers)."""
    return _all_gather_single(output, shard, group=group, async_op=async_op)


def reduce_scatter_into(output: torch.Tensor, full: torch.Tensor, group, async_op: bool = False):
    """Sum `full` over ranks and keep this rank's 1/N slice (along dim 0) in `output`."""
    return _reduce_scatter_single(output, full, group=group, async_op=async_op)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    dim = dim % x.dim()
    out = torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)  # [n, ...]
    _all_gather_single(out.view(-1), x.contiguous().view(-1), group=group)
    if dim == 0:
        return out.reshape((n * x.shape[0],) + tuple(x.shape[1:]))
    shape = list(x.shape)
    shape[dim] *= n
    return out.movedim(0, dim).reshape(shape)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    dim = dim % x.dim()
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {n} ranks")
    shape = list(x.shape)
    shape[dim] //= n
    chunks = x.unflatten(dim, (n, shape[dim])).movedim(dim, 0).contiguous()  # [n, ..., s/n, ...]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out.view(-1), chunks.view(-1), group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    """all-gather along `dim`; backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _Scatter(torch.autograd.Function):
    """keep this rank's slice of `dim`; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherReduceScatter(torch.autograd.Function):
    """all-gather along `dim`; backward: reduce-scatter (the input fed a rank-local computation)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterGather(torch.autograd.Function):
    """reduce-scatter along `dim`; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[.., n / TP] shards -> [.., n] on every rank."""
    return x if _size(group) == 1 else _Gather.apply(x, -1, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[.., n] -> this rank's [.., n / TP]."""
    return x if _size(group) == 1 else _Scatter.apply(x, -1, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] replicated -> this rank's [b, s / TP, h]."""
    return x if _size(group) == 1 else _Scatter.apply(x, SEQUENCE_DIM, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """[b, s / TP, h] -> [b, s, h]; the gradient is reduce-scattered back, or, when the gathered
    tensor feeds a computation replicated on every rank (`tensor_parallel_output_grad=False`: its
    gradient is already complete and the same on every rank), this rank's slice is kept."""
    if _size(group) == 1:
        return x
    gather = _GatherReduceScatter if tensor_parallel_output_grad else _Gather
    return gather.apply(x, SEQUENCE_DIM, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] partial sums -> this rank's [b, s / TP, h] of the total."""
    return x if _size(group) == 1 else _ReduceScatterGather.apply(x, SEQUENCE_DIM, group)
