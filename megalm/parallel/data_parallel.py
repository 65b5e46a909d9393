"""Data parallelism: gradient all-reduce in buckets, overlapped with the backward pass.

Each parameter's gradient lives in a slice of one flat buffer per bucket (`param.grad` is a view of
it), so a bucket is reduced with a single collective. Parameters are assigned to buckets in reverse
order of registration, which is roughly the order in which the backward pass produces their
gradients. A post-accumulate-grad hook counts the gradients that are ready; when the last one of a
bucket arrives during the last micro-batch of a step, the bucket's all-reduce is launched
asynchronously while autograd carries on with earlier layers. `finish_grad_sync()` launches any
bucket that did not fill (parameters unused in this step) and waits for all of them.

Gradients are averaged over data-parallel ranks, so N processes with micro batch b compute the
same update as one process with micro batch N x b.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn


class _Bucket:
    def __init__(self, params: List[nn.Parameter], dtype: torch.dtype, device: torch.device):
        self.params = params
        numel = sum(p.numel() for p in params)
        self.buffer = torch.zeros(numel, dtype=dtype, device=device)
        self.views = {}
        offset = 0
        for p in params:
            self.views[p] = self.buffer[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        self.ready = 0
        self.handle: Optional[dist.Work] = None


class DistributedDataParallel(nn.Module):
    """Wraps a module; `module.param.grad` points into contiguous per-bucket buffers."""

    def __init__(self, module: nn.Module, group: Optional[dist.ProcessGroup] = None,
                 bucket_size: int = 40_000_000, overlap_grad_reduce: bool = True):
        super().__init__()
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.overlap_grad_reduce = overlap_grad_reduce and self.world_size > 1
        self._sync_enabled = True
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: List[_Bucket] = []
        current: List[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            if current and (size + p.numel() > bucket_size or p.dtype != current[0].dtype):
                self.buckets.append(_Bucket(current, current[0].dtype, current[0].device))
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            self.buckets.append(_Bucket(current, current[0].dtype, current[0].device))
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        for p in params:
            p.grad = self._bucket_of[p].views[p]
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

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
        if not (self._sync_enabled and self.overlap_grad_reduce):
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.handle is None:
            bucket.buffer.div_(self.world_size)
            bucket.handle = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Make every gradient the data-parallel average. Call after the last backward of a step."""
        if self.world_size == 1:
            return
        for bucket in self.buckets:
            self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
            bucket.ready = 0

    def zero_grad_buffer(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.ready = 0
            for p in bucket.params:
                p.grad = bucket.views[p]

    def broadcast_params(self, src: int = 0) -> None:
        """Start every rank from rank `src`'s weights."""
        if self.world_size == 1:
            return
        for p in list(self.module.parameters()) + list(self.module.buffers()):
            dist.broadcast(p.data, src=dist.get_global_rank(self.group, src), group=self.group)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)
