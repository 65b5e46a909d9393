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

With `--data-parallel-sharding-strategy optim_grads` (ZeRO-2) no bucket keeps a full gradient buffer:
when a bucket's gradients are ready (after every micro-batch) they are copied into a temporary flat
buffer, autograd's tensors are dropped, and the buffer is reduce-scattered into the rank's
persistent shard. With `optim_grads_params` (ZeRO-3) every transformer layer is a bucket (its
experts a second one, over the expert-data-parallel group), and so is the rest of the model; a rank
keeps only its shard of their parameters, and forward / backward hooks gather a layer just before
it runs (prefetching the next) and free it after. docs/PARALLELISM.md describes both.

Two kinds of parameters need a sum over another group before the data-parallel reduction, and sit
in buckets of their own that are reduced in `finish_grad_sync()`: with sequence parallelism the
replicated norm weights and biases (each tensor-parallel rank saw only its part of the sequence:
sum over the tensor-parallel group), and the embedding shared by the first and last pipeline stages
(sum of the two copies' gradients over the embedding group, as Megatron-LM does).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import SHARDING_STRATEGIES
from megalm.parallel.mappings import all_gather_into, reduce_scatter_into
from megalm.parallel.state import ParallelState


class _Bucket:
    """The parameters reduced by one collective. `stage` is what this bucket shards over its reduce
    group, as a ZeRO stage: 0 nothing, 1 the optimizer state, 2 also the gradients, 3 also the
    parameters (see the module docstring)."""

    def __init__(self, params: List[nn.Parameter], dp_size: int, dp_rank: int, stage: int,
                 pre_reduce_group: Optional[dist.ProcessGroup] = None,
                 reduce_group: Optional[dist.ProcessGroup] = None):
        self.params = params
        self.stage = stage
        self.pre_reduce_group = pre_reduce_group
        self.reduce_group = reduce_group  # instead of the data-parallel group (expert parameters)
        self.num_shards = dp_size  # the ranks of the reduce group (the distributed optimizer's shards)
        self.dtype, self.device = params[0].dtype, params[0].device
        if any(p.dtype != self.dtype for p in params):
            raise ValueError("a sharded bucket holds parameters of one dtype")
        numel = sum(p.numel() for p in params)
        self.padded = -(-numel // dp_size) * dp_size if stage else numel
        self.ranges, self.views = {}, {}
        offset = 0
        for p in params:
            self.ranges[p] = (offset, offset + p.numel())
            offset += p.numel()
        self.shard_size = self.padded // dp_size
        self.shard_start = dp_rank * self.shard_size
        self.grad = self.param = self.param_shard = self.grad_shard = None
        if stage <= 1:  # a persistent full-size gradient buffer, `param.grad` a view of it
            self.grad = self.zeros()
            for p in params:
                start, end = self.ranges[p]
                self.views[p] = self.grad[start:end].view_as(p)
        if stage >= 1:
            # The parameters move into one flat buffer (for the all-gather of updated shards).
            self.param = self.zeros()
            for p in params:
                start, end = self.ranges[p]
                self.param[start:end].copy_(p.data.view(-1))
                p.data = self.param[start:end].view_as(p)
            self.grad_shard = self.grad if stage == 1 and dp_size == 1 else torch.zeros(
                self.shard_size, dtype=self.dtype, device=self.device)
        if stage == 3:  # this rank keeps its shard; the full buffer exists only while gathered
            self.param_shard = self.param[self.shard_start: self.shard_start + self.shard_size].clone()
            self.gathered, self.gather_handle = True, None
            self.release()
        self.ready = set()  # parameters whose gradient of this step (or micro-batch) is complete
        self.handle: Optional[dist.Work] = None

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.padded, dtype=self.dtype, device=self.device)

    def release(self) -> None:
        """ZeRO-3: free the gathered parameters' memory. The parameters keep their shapes (and the
        autograd graph its references); `gather` refills the same storage."""
        if self.gather_handle is not None:  # a prefetch still writing into the storage
            self.gather_handle.wait()
            self.gather_handle = None
        if self.gathered:
            self.param.untyped_storage().resize_(0)
            self.gathered = False

    def shard_pieces(self):
        """(param, start, end) for every parameter overlapping this rank's shard: elements
        [start, end) of the flattened parameter are this rank's to update."""
        lo, hi = self.shard_start, self.shard_start + self.shard_size
        for p in self.params:
            start, end = self.ranges[p]
            if start < hi and end > lo:
                yield p, max(start, lo) - start, min(end, hi) - start

    def param_piece(self, p: nn.Parameter, start: int, end: int) -> torch.Tensor:
        if self.param_shard is not None:
            offset = self.ranges[p][0] - self.shard_start
            return self.param_shard[offset + start: offset + end]
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
    """Wraps a module (or one pipeline chunk); `module.param.grad` points into per-bucket buffers
    (or, sharding gradients, is autograd's own until its bucket is reduce-scattered)."""

    def __init__(self, module: nn.Module, state: Optional[ParallelState] = None, bucket_size: int = 40_000_000,
                 overlap_grad_reduce: bool = True, use_distributed_optimizer: bool = False,
                 sharding: Optional[str] = None):
        super().__init__()
        state = state or ParallelState()
        self.module = module
        self.group = state.data_parallel_group
        self.world_size = state.data_parallel_size if self.group is not None else 1
        self.stage = SHARDING_STRATEGIES[sharding or ("optim" if use_distributed_optimizer else "no_shard")]
        self.sharded = self.stage >= 1
        self.overlap_grad_reduce = overlap_grad_reduce and (self.world_size > 1 or self.stage >= 2)
        self._sync_enabled = True
        params = [p for p in module.parameters() if p.requires_grad]
        dp_rank = state.data_parallel_rank if self.group is not None else 0
        # Expert-parallel experts differ between the ranks of an expert-parallel group: their
        # gradients are averaged over the expert-data-parallel group only (megalm.parallel.expert).
        # With the distributed optimizer their buckets are sharded over that group too.
        self.expert_group = state.expert_data_parallel_group if state.expert_model_parallel_size > 1 else None
        expert_params = []

        def make(bucket_params, group=None, reduce_group=None, stage=self.stage):
            size, rank = self.world_size, dp_rank
            if reduce_group is not None:
                size, rank = dist.get_world_size(reduce_group), dist.get_rank(reduce_group)
            self.buckets.append(_Bucket(bucket_params, size, rank, stage, group, reduce_group))

        self.buckets: List[_Bucket] = []
        special = {}
        units = _shard_units(module, self.stage)
        unit_of = {p: i for i, unit in enumerate(units) for p in unit.parameters() if p.requires_grad}
        current: List[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            if self.expert_group is not None and getattr(p, "expert_parallel", False) and p not in unit_of:
                expert_params.append(p)
                continue
            group = _pre_reduce_group(p, state)
            if group is not None:
                special.setdefault((id(group), p.dtype), (group, []))[1].append(p)
                continue
            if p in unit_of:
                continue
            if current and (size + p.numel() > bucket_size or p.dtype != current[0].dtype):
                make(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            make(current)
        # The buckets summed over another group first are reduced after the backward pass, all
        # at once: they keep a full gradient buffer and full parameters (ZeRO-1 at most).
        for group, bucket_params in special.values():
            make(bucket_params, group, stage=min(self.stage, 1))
        if expert_params:
            make(expert_params, reduce_group=self.expert_group)
        # ZeRO-3: the buckets of each unit (a transformer layer; the rest of the model: embeddings,
        # final norm, output layer), gathered before the unit runs and released after; a layer's
        # experts (expert parallelism) are a bucket of their own, over the expert-data-parallel group.
        self.units = []  # (module, its buckets)
        placed = {p for b in self.buckets for p in b.params}  # summed over another group first: not in a unit
        for i, unit in enumerate(units):
            unit_params = [p for p in params if unit_of.get(p) == i and p not in placed]
            expert = [self.expert_group is not None and getattr(p, "expert_parallel", False) for p in unit_params]
            first = len(self.buckets)
            for is_expert, group in ((False, None), (True, self.expert_group)):
                bucket_params = [p for p, e in zip(unit_params, expert) if e == is_expert]
                if bucket_params:
                    make(bucket_params, reduce_group=group)
            self.units.append((unit, self.buckets[first:]))
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._in_flight = collections.deque()  # (bucket, handle, reduced shard, flat gradients)
        self._hooks = []
        for p in params:
            if self._bucket_of[p].stage <= 1:
                p.grad = self._bucket_of[p].views[p]
            else:
                p.grad = None
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        for i, (unit, _) in enumerate(self.units):
            self._hooks.append(unit.register_forward_pre_hook(functools.partial(self._before_forward, i)))
            self._hooks.append(unit.register_forward_hook(functools.partial(self._after_forward, i)))

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
        """Accumulate gradients locally (all micro-batches but the last of a step). Sharded
        gradients are reduce-scattered after every micro-batch all the same: accumulating them
        locally would need the full gradient buffer ZeRO-2 does without."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[param]
        # Autograd may have replaced .grad (e.g. after set_to_none); put the view back.
        if bucket.stage <= 1 and param.grad is not bucket.views[param]:
            bucket.views[param].copy_(param.grad)
            param.grad = bucket.views[param]
        if not self.overlap_grad_reduce or bucket.pre_reduce_group is not None:
            return
        if not self._sync_enabled and bucket.stage <= 1:
            return
        bucket.ready.add(param)
        if len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.stage >= 2:
            self._reduce_scatter_grads(bucket)
            return
        if bucket.handle is not None or self.world_size == 1:
            return
        bucket.grad.div_(self.world_size)
        group = bucket.reduce_group or self.group
        if self.sharded and bucket.num_shards > 1:
            bucket.handle = reduce_scatter_into(bucket.grad_shard, bucket.grad, group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.grad, group=group, async_op=True)

    def _reduce_scatter_grads(self, bucket: _Bucket) -> None:
        """ZeRO-2/3: the bucket's gradients (this micro-batch's, or those accumulated since its last
        reduction) go into a temporary flat buffer, autograd's tensors are dropped, and the buffer is
        reduce-scattered and added to this rank's shard. At most two buckets are in flight, so the
        full-size gradients never exist at once. ZeRO-3 releases a layer's parameters: its backward
        pass is done (those outside the layers stay gathered until the step's last micro-batch)."""
        bucket.ready.clear()
        flat = bucket.zeros()
        for p in bucket.params:
            if p.grad is not None:
                start, end = bucket.ranges[p]
                flat[start:end].copy_(p.grad.view(-1))
                p.grad = None
        if bucket.stage == 3 and bucket not in self.units[0][1]:  # the rest of the model: at the step's end
            bucket.release()
        flat.div_(self.world_size)
        if bucket.num_shards == 1:
            bucket.grad_shard.add_(flat)
            return
        shard = torch.empty_like(bucket.grad_shard)
        handle = reduce_scatter_into(shard, flat, bucket.reduce_group or self.group, async_op=True)
        self._in_flight.append((bucket, handle, shard, flat))
        while len(self._in_flight) > 2:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        bucket, handle, shard, _ = self._in_flight.popleft()
        handle.wait()
        bucket.grad_shard.add_(shard)

    def finish_grad_sync(self) -> None:
        """Make every gradient the data-parallel average (with the distributed optimizer: this rank's
        shard of it). Call after the last backward of a step."""
        for bucket in self.buckets:
            if bucket.pre_reduce_group is not None:
                dist.all_reduce(bucket.grad, group=bucket.pre_reduce_group)
        for bucket in self.buckets:
            if bucket.stage <= 1 or bucket.ready or any(p.grad is not None for p in bucket.params):
                self._launch(bucket)
        while self._in_flight:
            self._complete_oldest()
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle = None
            bucket.ready.clear()
            if bucket.stage == 3:
                bucket.release()

    def zero_grad_buffer(self) -> None:
        for bucket in self.buckets:
            bucket.ready.clear()
            if bucket.stage >= 2:
                bucket.grad_shard.zero_()
                continue
            bucket.grad.zero_()
            for p in bucket.params:
                p.grad = bucket.views[p]

    def gather_params(self) -> None:
        """Distributed optimizer: every rank updated its shard; all-gather the full parameters
        (ZeRO-3: not now, but just before each unit runs)."""
        if not self.sharded or self.world_size == 1:
            return
        handles = [all_gather_into(b.param, b.param[b.shard_start: b.shard_start + b.shard_size].clone(),
                                   b.reduce_group or self.group, async_op=True)
                   for b in self.buckets if b.num_shards > 1 and b.stage <= 2]
        for handle in handles:
            handle.wait()

    # -- ZeRO-3: parameters gathered one unit at a time

    def _gather(self, bucket: _Bucket, wait: bool = True) -> None:
        """All-gather a ZeRO-3 bucket's parameters into their storage (`wait=False`: a prefetch,
        waited for when the unit runs)."""
        if not bucket.gathered:
            bucket.param.untyped_storage().resize_(bucket.padded * bucket.param.element_size())
            bucket.gathered = True
            if bucket.num_shards == 1:
                bucket.param.data.copy_(bucket.param_shard)
            else:
                # .data: the parameters' version counters stay as autograd saved them.
                bucket.gather_handle = all_gather_into(bucket.param.data, bucket.param_shard,
                                                       bucket.reduce_group or self.group, async_op=True)
        if wait and bucket.gather_handle is not None:
            bucket.gather_handle.wait()
            bucket.gather_handle = None

    def _gather_unit(self, index: int, wait: bool = True) -> None:
        if 0 <= index < len(self.units):
            for bucket in self.units[index][1]:
                self._gather(bucket, wait)

    def _release_unit(self, index: int) -> None:
        for bucket in self.units[index][1]:
            bucket.release()

    def _prefetch(self, index: int) -> None:
        self._gather_unit(index, wait=False)

    def _before_forward(self, index: int, module, args) -> None:
        self._gather_unit(index)
        if torch._C._current_graph_task_id() == -1:  # not a recompute: the next layer runs next
            self._prefetch(index + 1)

    def _after_forward(self, index: int, module, args, output) -> None:
        """A transformer layer releases its parameters after its forward and gathers them again when
        the gradient of its output arrives; the rest of the model (unit 0: embeddings, output layer,
        first and last in the backward pass) keeps them until `finish_grad_sync`, gathered once per
        step. A forward run again inside the backward pass (activation recompute) keeps them for
        that backward. Without gradients (evaluation) every unit is released after its forward."""
        if torch._C._current_graph_task_id() != -1:
            return
        if not torch.is_grad_enabled():
            self._release_unit(index)
        elif index > 0 and torch.is_tensor(output) and output.requires_grad:
            output.register_hook(functools.partial(self._before_backward, index))
            self._release_unit(index)
        # otherwise (an output the backward cannot announce) it stays gathered until it is reduced

    def _before_backward(self, index: int, grad: torch.Tensor) -> None:
        self._gather_unit(index)
        self._prefetch(index - 1 if index > 1 else -1)

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        """ZeRO-3: every parameter gathered (to save or broadcast them); on exit each rank takes its
        shard of them back and releases the rest. Collective: every data-parallel rank enters it."""
        zero3 = [bucket for _, buckets in self.units for bucket in buckets]
        for bucket in zero3:
            self._gather(bucket)
        try:
            yield
        finally:
            for bucket in zero3:
                bucket.param_shard.copy_(bucket.param[bucket.shard_start: bucket.shard_start + bucket.shard_size])
                bucket.release()

    def broadcast_params(self, src: int = 0) -> None:
        """Start every data-parallel rank from rank `src`'s weights."""
        if self.world_size == 1:
            return
        with self.full_params():
            for p in list(self.module.parameters()) + list(self.module.buffers()):
                group = self.expert_group if self.expert_group is not None and getattr(p, "expert_parallel", False) \
                    else self.group
                dist.broadcast(p.data, src=dist.get_global_rank(group, src), group=group)

    def state_tensors(self) -> tuple:
        """(weights, gradients): the tensors this rank holds for its module, for measuring memory
        (views and released storage included: count distinct storages, see `storage_bytes`)."""
        params = list(self.module.parameters())
        weights = params + [b.param_shard for b in self.buckets if b.param_shard is not None]
        grads = [p.grad for p in params if p.grad is not None]
        grads += [t for b in self.buckets for t in (b.grad, b.grad_shard) if t is not None]
        grads += [t for _, _, shard, flat in self._in_flight for t in (shard, flat)]  # ZeRO-2/3, mid-step
        return weights, grads

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)


def _shard_units(module: nn.Module, stage: int) -> List[nn.Module]:
    """ZeRO-3's units, in forward order: the module itself (for what lies outside the layers), then
    each transformer layer of its `layers`. A module without `layers` is one unit."""
    if stage < 3:
        return []
    return [module] + list(getattr(module, "layers", []))


@contextlib.contextmanager
def full_params(ddps: List[DistributedDataParallel]) -> Iterator[None]:
    """`DistributedDataParallel.full_params` of every model chunk."""
    with contextlib.ExitStack() as stack:
        for ddp in ddps:
            stack.enter_context(ddp.full_params())
        yield


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a released ZeRO-3 buffer has none)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
