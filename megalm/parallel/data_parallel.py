"""Data parallelism: gradient reduction in buckets, overlapped with the backward pass.

Each parameter's gradient lives in a slice of one flat buffer per bucket (`param.grad` is a view of
it), so a bucket is reduced with a single collective. Parameters are assigned to buckets in reverse
order of registration, which is roughly the order in which the backward pass produces their
gradients. A post-accumulate-grad hook counts the gradients that are ready; when the last one of a
bucket arrives during the last micro-batch of a step, the bucket's reduction is launched
asynchronously while autograd carries on with earlier layers. `finish_grad_sync()` launches any
bucket that did not fill (parameters unused in this step) and waits for all of them.

Gradients are averaged over data-parallel ranks, so N processes with micro batch b compute the
same update as one process with micro batch N x b. Frozen parameters (`requires_grad=False`: the
base weights of a LoRA model) get no slice of a bucket and no hook, and so no gradient.

With the distributed optimizer (ZeRO-1, `megalm.parallel.distributed_optimizer`) each bucket is
padded to a multiple of the data-parallel size and reduce-scattered instead of all-reduced: rank r
receives the averaged gradients of the r-th contiguous 1/DP of the bucket, the part of the
parameters it updates. The parameters themselves then live in one flat buffer per bucket too, so
that the updated shards are all-gathered with one collective per bucket. The experts' bucket of an
expert-parallel model is padded, reduce-scattered and gathered over the expert-data-parallel group
instead (each expert has DP / EP copies).

Two kinds of parameters need a sum over another group before the data-parallel reduction, and sit
in buckets of their own that are reduced in `finish_grad_sync()`: with sequence parallelism the
replicated norm weights and biases (each tensor-parallel rank saw only its part of the sequence:
sum over the tensor-parallel group), and the embedding shared by the first and last pipeline stages
(sum of the two copies' gradients over the embedding group, as Megatron-LM does).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.parallel.mappings import all_gather_into, reduce_scatter_into
from megalm.parallel.state import ParallelState


class _Bucket:
    def __init__(self, params: List[nn.Parameter], dp_size: int, dp_rank: int, sharded: bool,
                 pre_reduce_group: Optional[dist.ProcessGroup] = None,
                 reduce_group: Optional[dist.ProcessGroup] = None):
        self.params = params
        self.pre_reduce_group = pre_reduce_group
        self.reduce_group = reduce_group  # instead of the data-parallel group (expert parameters)
        self.num_shards = dp_size  # the ranks of the reduce group (the distributed optimizer's shards)
        dtype, device = params[0].dtype, params[0].device
        numel = sum(p.numel() for p in params)
        padded = -(-numel // dp_size) * dp_size if sharded else numel
        self.grad = torch.zeros(padded, dtype=dtype, device=device)
        self.ranges, self.views = {}, {}
        offset = 0
        for p in params:
            self.ranges[p] = (offset, offset + p.numel())
            self.views[p] = self.grad[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        self.shard_size = padded // dp_size
        self.shard_start = dp_rank * self.shard_size
        self.param = self.grad_shard = None
        if sharded:
            # The parameters move into one flat buffer (for the all-gather of updated shards).
            self.param = torch.zeros(padded, dtype=dtype, device=device)
            for p in params:
                start, end = self.ranges[p]
                self.param[start:end].copy_(p.data.view(-1))
                p.data = self.param[start:end].view_as(p)
            self.grad_shard = self.grad if dp_size == 1 else torch.zeros(self.shard_size, dtype=dtype, device=device)
        self.ready = 0
        self.handle: Optional[dist.Work] = None

    def shard_pieces(self):
        """(param, start, end) for every parameter overlapping this rank's shard: elements
        [start, end) of the flattened parameter are this rank's to update."""
        lo, hi = self.shard_start, self.shard_start + self.shard_size
        for p in self.params:
            start, end = self.ranges[p]
            if start < hi and end > lo:
                yield p, max(start, lo) - start, min(end, hi) - start

    def param_piece(self, p: nn.Parameter, start: int, end: int) -> torch.Tensor:
        offset = self.ranges[p][0]
        return self.param[offset + start: offset + end]

    def grad_piece(self, p: nn.Parameter, start: int, end: int) -> torch.Tensor:
        offset = self.ranges[p][0] - self.shard_start
        return self.grad_shard[offset + start: offset + end]


def _pre_reduce_group(p: nn.Parameter, state: ParallelState) -> Optional[dist.ProcessGroup]:
    if getattr(p, "sequence_parallel", False) and state.tensor_model_parallel_size > 1:
        return state.tensor_model_parallel_group
    if getattr(p, "shared_embedding", False) and state.pipeline_model_parallel_size > 1:
        return state.embedding_group
    return None


class DistributedDataParallel(nn.Module):
    """Wraps a module (or one pipeline chunk); `module.param.grad` points into per-bucket buffers."""

    def __init__(self, module: nn.Module, state: Optional[ParallelState] = None, bucket_size: int = 40_000_000,
                 overlap_grad_reduce: bool = True, use_distributed_optimizer: bool = False):
        super().__init__()
        state = state or ParallelState()
        self.module = module
        self.group = state.data_parallel_group
        self.world_size = state.data_parallel_size if self.group is not None else 1
        self.sharded = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce and self.world_size > 1
        self._sync_enabled = True
        params = [p for p in module.parameters() if p.requires_grad]
        dp_rank = state.data_parallel_rank if self.group is not None else 0
        # Expert-parallel experts differ between the ranks of an expert-parallel group: their
        # gradients are averaged over the expert-data-parallel group only (megalm.parallel.expert).
        # With the distributed optimizer their buckets are sharded over that group too.
        self.expert_group = state.expert_data_parallel_group if state.expert_model_parallel_size > 1 else None
        expert_params = []

        def make(bucket_params, group=None, reduce_group=None):
            size, rank = self.world_size, dp_rank
            if reduce_group is not None:
                size, rank = dist.get_world_size(reduce_group), dist.get_rank(reduce_group)
            self.buckets.append(_Bucket(bucket_params, size, rank, self.sharded, group, reduce_group))

        self.buckets: List[_Bucket] = []
        special = {}
        current: List[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            if self.expert_group is not None and getattr(p, "expert_parallel", False):
                expert_params.append(p)
                continue
            group = _pre_reduce_group(p, state)
            if group is not None:
                special.setdefault((id(group), p.dtype), (group, []))[1].append(p)
                continue
            if current and (size + p.numel() > bucket_size or p.dtype != current[0].dtype):
                make(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            make(current)
        for group, bucket_params in special.values():
            make(bucket_params, group)
        if expert_params:
            make(expert_params, reduce_group=self.expert_group)
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._hooks = []
        for p in params:
            p.grad = self._bucket_of[p].views[p]
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def close(self) -> None:
        """Unhook the parameters and drop their gradient views. A parameter's hook points back at this
        wrapper through autograd's C++ side, a cycle the garbage collector cannot see, and the
        wrapper holds the process groups: left in place, they would outlive the run."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for p in self._bucket_of:
            p.grad = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (all micro-batches but the last of a step)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[param]
        # Autograd may have replaced .grad (e.g. after set_to_none); put the view back.
        if param.grad is not bucket.views[param]:
            bucket.views[param].copy_(param.grad)
            param.grad = bucket.views[param]
        if not (self._sync_enabled and self.overlap_grad_reduce) or bucket.pre_reduce_group is not None:
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.handle is not None or self.world_size == 1:
            return
        bucket.grad.div_(self.world_size)
        group = bucket.reduce_group or self.group
        if self.sharded and bucket.num_shards > 1:
            bucket.handle = reduce_scatter_into(bucket.grad_shard, bucket.grad, group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.grad, group=group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Make every gradient the data-parallel average (with the distributed optimizer: this rank's
        shard of it). Call after the last backward of a step."""
        for bucket in self.buckets:
            if bucket.pre_reduce_group is not None:
                dist.all_reduce(bucket.grad, group=bucket.pre_reduce_group)
        for bucket in self.buckets:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle = None
            bucket.ready = 0

    def zero_grad_buffer(self) -> None:
        for bucket in self.buckets:
            bucket.grad.zero_()
            bucket.ready = 0
            for p in bucket.params:
                p.grad = bucket.views[p]

    def gather_params(self) -> None:
        """Distributed optimizer: every rank updated its shard; all-gather the full parameters."""
        if not self.sharded or self.world_size == 1:
            return
        handles = [all_gather_into(b.param, b.param[b.shard_start: b.shard_start + b.shard_size].clone(),
                                   b.reduce_group or self.group, async_op=True) for b in self.buckets if b.num_shards > 1]
        for handle in handles:
            handle.wait()

    def broadcast_params(self, src: int = 0) -> None:
        """Start every data-parallel rank from rank `src`'s weights."""
        if self.world_size == 1:
            return
        for p in list(self.module.parameters()) + list(self.module.buffers()):
            group = self.expert_group if self.expert_group is not None and getattr(p, "expert_parallel", False) \
                else self.group
            dist.broadcast(p.data, src=dist.get_global_rank(group, src), group=group)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)
