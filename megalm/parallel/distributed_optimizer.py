"""Optimizers over a model-parallel rank's parameters, with or without ZeRO-1 sharding.

`LocalOptimizer`: every rank updates all the trainable parameters it holds (its tensor/pipeline
shard of the model) with an ordinary AdamW or Lion, after the data-parallel all-reduce of the
gradients. Both optimizers hold only parameters with `requires_grad` (the distributed one through
the gradient buckets, which hold nothing else): a LoRA model's frozen base has no optimizer state.

`DistributedOptimizer` (`--use-distributed-optimizer`, ZeRO stage 1, and stages 2 and 3; Rajbhandari et al. 2020):
the optimizer state is split across the data-parallel ranks. The gradient buckets of
`DistributedDataParallel` are reduce-scattered, so rank r holds the averaged gradient of the r-th
contiguous 1/DP of every bucket; it updates the matching slice of the parameters (the pieces of
the parameters that overlap its range, as 1-D views of the flat parameter buffer) with its own
AdamW, whose moments therefore exist for 1/DP of the model only; then the buckets' parameters are
all-gathered (an expert-parallel model's experts over the expert-data-parallel group instead, see
`megalm.parallel.data_parallel`). Parameters stay fp32 (mixed precision is autocast), so the
optimizer's memory per rank is 4 (weights) + 4 (gradients) + 8 / DP (moments) bytes per parameter
instead of 16. ZeRO-2 and ZeRO-3 (`--data-parallel-sharding-strategy`) change only the buckets: their
gradients (and ZeRO-3's parameters) exist per rank as the shard this optimizer updates, and ZeRO-3's
buckets are gathered by the forward hooks rather than after the step. `--optimizer-cpu-offload`
updates host copies of the shard instead, and copies the result back.

Both save and load their state keyed by parameter name, with each parameter's state whole (the
distributed optimizer gathers its shards over the data-parallel group first), so a checkpoint does
not depend on the data-parallel size or on whether the optimizer was distributed, and the resharder
can split it like the weights. Checkpoints of earlier versions, keyed by position, still load.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn

from megalm.parallel.clip_grads import counts_for_norm
from megalm.parallel.data_parallel import DistributedDataParallel
from megalm.parallel.state import ParallelState

# Builds the inner optimizer from (tensor to update, model parameter it belongs to) pairs; the
# training loop passes `megalm.training.optimizer.build_optimizer` with its settings.
OptimizerFactory = Callable[[list], torch.optim.Optimizer]


def decays(param: torch.Tensor) -> bool:
    """Matrices (linear and embedding weights) are decayed; norm weights and biases are not."""
    return param.ndim >= 2


def group_names(named) -> List[List[str]]:
    """The optimizer's two parameter groups as names, in its order: [decayed, not decayed]. Every
    optimizer megalm builds (`megalm.training.optimizer.build_optimizer`) and every checkpoint
    written before states were keyed by name follow this order."""
    named = list(named)
    return [[n for n, p in named if decays(p)], [n for n, p in named if not decays(p)]]


def param_names(modules: List[nn.Module]) -> Dict[nn.Parameter, str]:
    """Parameter -> its name in the full model (pipeline chunks number their layers globally)."""
    return {p: name for m in modules for name, p in m.named_parameters()}


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def state_dict_by_name(optimizer: torch.optim.Optimizer, names: Dict[nn.Parameter, str]) -> dict:
    """torch's optimizer state dict with parameter names in place of positions."""
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    return {"state": {order[i]: s for i, s in sd["state"].items()},
            "param_groups": [dict(_hyperparameters(g), params=[order[i] for i in g["params"]])
                             for g in sd["param_groups"]]}


def _is_legacy(saved: dict) -> bool:
    return any(isinstance(i, int) for g in saved["param_groups"] for i in g["params"])


def _check_groups(saved: dict, num_groups: int) -> None:
    if len(saved["param_groups"]) != num_groups:
        raise ValueError(f"the saved optimizer state has {len(saved['param_groups'])} parameter groups, "
                         f"this optimizer {num_groups}")


def load_state_dict_by_name(optimizer: torch.optim.Optimizer, saved: dict, names: Dict[nn.Parameter, str]) -> None:
    if _is_legacy(saved):  # positions: the same model, the same order
        optimizer.load_state_dict(saved)
        return
    _check_groups(saved, len(optimizer.param_groups))
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    missing = [n for n in order if n not in saved["state"]] if saved["state"] else []
    if missing:
        raise ValueError(f"the saved optimizer state has no entry for {missing[:3]}")
    index = {n: i for i, n in enumerate(order)}
    groups, start = [], 0
    for g, s in zip(optimizer.param_groups, saved["param_groups"]):
        groups.append(dict(_hyperparameters(s), params=list(range(start, start + len(g["params"])))))
        start += len(g["params"])
    optimizer.load_state_dict({"state": {index[n]: s for n, s in saved["state"].items() if n in index},
                               "param_groups": groups})


class LocalOptimizer:
    """AdamW / Lion over every trainable parameter this rank holds."""

    def __init__(self, chunks: List[nn.Module], make_optimizer: OptimizerFactory, state: ParallelState):
        self.state = state
        self.optimizer = make_optimizer([(p, p) for chunk in chunks for p in chunk.parameters() if p.requires_grad])
        self.names = param_names(chunks)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.norm_group = state.model_parallel_group if state.model_parallel else None
        if state.expert_model_parallel_size > 1:  # every expert shard once: tensor x pipeline x expert ranks
            self.norm_group = state.model_and_expert_parallel_group

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def grads_for_clipping(self):
        """(every gradient, those counted in the global norm)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        counted = [p.grad for p in self.params if p.grad is not None and counts_for_norm(p, self.state)]
        return grads, counted

    def step(self) -> None:
        self.optimizer.step()

    def state_tensors(self) -> list:
        """The optimizer's moments (for measuring memory)."""
        return _moments(self.optimizer)

    def state_dict(self) -> dict:
        return state_dict_by_name(self.optimizer, self.names)

    def load_state_dict(self, saved: dict) -> None:
        load_state_dict_by_name(self.optimizer, saved, self.names)


class DistributedOptimizer:
    """ZeRO-1/2/3: this data-parallel rank's shard of every bucket, updated by an inner AdamW / Lion
    (`offload`: on CPU copies of the shard, see `--optimizer-cpu-offload`)."""

    def __init__(self, ddps: List[DistributedDataParallel], make_optimizer: OptimizerFactory, state: ParallelState,
                 offload: bool = False):
        self.state, self.ddps = state, ddps
        self.names = param_names([d.module for d in ddps])
        # (piece parameter, full parameter, start, end, bucket, the tensor the optimizer updates)
        self.pieces = []
        pin = offload and torch.cuda.is_available()
        for ddp in ddps:
            for bucket in ddp.buckets:
                for p, start, end in bucket.shard_pieces():
                    piece = nn.Parameter(bucket.param_piece(p, start, end))
                    piece.grad = bucket.grad_piece(p, start, end)
                    updated = piece
                    if offload:  # fp32 master copy and its gradient in (pinned) host memory
                        host = piece.detach().to("cpu", copy=True)
                        updated = nn.Parameter(host.pin_memory() if pin else host)
                        updated.grad = torch.empty_like(updated)
                    self.pieces.append((piece, p, start, end, bucket, updated))
        pairs = [(updated, p) for _, p, *_, updated in self.pieces]
        self.offload = offload
        self.optimizer = make_optimizer(pairs, device=torch.device("cpu")) if offload else make_optimizer(pairs)
        self.norm_group = dist.group.WORLD if state.distributed else None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def grads_for_clipping(self):
        grads = [piece.grad for piece, *_ in self.pieces]
        counted = [piece.grad for piece, p, *_ in self.pieces if counts_for_norm(p, self.state, sharded=True)]
        return grads, counted

    def state_tensors(self) -> list:
        """The optimizer's moments, and with offload the host copies of the weights and gradients."""
        return _moments(self.optimizer) + ([t for *_, u in self.pieces for t in (u, u.grad)] if self.offload else [])

    @torch.no_grad()
    def step(self) -> None:
        if self.offload:  # gradients to the host, the step there, the new weights back
            for piece, *_, updated in self.pieces:
                updated.grad.copy_(piece.grad, non_blocking=True)
            _synchronize(self.pieces[0][0].device if self.pieces else None)
        self.optimizer.step()
        if self.offload:  # (the next step's synchronize orders these before the host copies change)
            for piece, *_, updated in self.pieces:
                piece.copy_(updated, non_blocking=True)
        for ddp in self.ddps:
            ddp.gather_params()

    # -- checkpoints: whole per-parameter state, gathered over the data-parallel group

    def state_dict(self) -> dict:
        inner = self.optimizer.state
        keys = sorted({k for s in inner.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
        step = next((s["step"] for s in inner.values() if "step" in s), None)
        state: Dict[str, dict] = {}
        for ddp in self.ddps:
            for bucket in ddp.buckets:
                for key in keys:
                    full = bucket.zeros()
                    for _, p, start, end, b, updated in self.pieces:
                        if b is bucket and updated in inner:
                            offset = bucket.ranges[p][0]
                            full[offset + start: offset + end] = inner[updated][key]
                    if bucket.num_shards > 1:  # every element has one owner
                        dist.all_reduce(full, group=bucket.reduce_group or ddp.group)
                    for p in bucket.params:
                        begin, finish = bucket.ranges[p]
                        state.setdefault(self.names[p], {})[key] = full[begin:finish].view_as(p).cpu()
        if step is not None:
            for s in state.values():
                s["step"] = step.detach().clone().cpu()
        params = [p for ddp in self.ddps for bucket in ddp.buckets for p in bucket.params]
        named_groups = group_names((self.names[p], p) for p in params)
        return {"state": state,
                "param_groups": [dict(_hyperparameters(g), params=n)
                                 for g, n in zip(self.optimizer.param_groups, named_groups)]}

    def load_state_dict(self, saved: dict) -> None:
        if _is_legacy(saved):
            saved = _legacy_to_named(saved, self.ddps)
        _check_groups(saved, len(self.optimizer.param_groups))
        order = [piece for g in self.optimizer.param_groups for piece in g["params"]]
        where = {updated: (p, start, end) for _, p, start, end, _, updated in self.pieces}
        state = {}
        for i, piece in enumerate(order):
            p, start, end = where[piece]
            entry = saved["state"].get(self.names[p])
            if entry is None:
                if saved["state"]:
                    raise ValueError(f"the saved optimizer state has no entry for {self.names[p]}")
                continue
            state[i] = {k: (v.reshape(-1)[start:end] if torch.is_tensor(v) and v.dim() > 0 else v)
                        for k, v in entry.items()}
        groups, start = [], 0
        for g, s in zip(self.optimizer.param_groups, saved["param_groups"]):
            groups.append(dict(_hyperparameters(s), params=list(range(start, start + len(g["params"])))))
            start += len(g["params"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _moments(optimizer: torch.optim.Optimizer) -> list:
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]


def _synchronize(device) -> None:
    """Non-blocking copies between a GPU and pinned memory: wait before the host reads them."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _legacy_to_named(saved: dict, ddps: List[DistributedDataParallel]) -> dict:
    """A position-keyed state (written by a single-process run) to names: positions follow the
    model's parameters in `group_names` order."""
    modules = [d.module for d in ddps]
    names = param_names(modules)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    order = sum(group_names((names[p], p) for p in params), [])
    return {"state": {order[i]: s for i, s in saved["state"].items()},
            "param_groups": [dict(_hyperparameters(g), params=[order[i] for i in g["params"]])
                             for g in saved["param_groups"]]}


def build_parallel_optimizer(chunks: List[nn.Module], ddps: List[DistributedDataParallel],
                             make_optimizer: OptimizerFactory, state: ParallelState, distributed: bool,
                             offload: bool = False):
    """The distributed (ZeRO) optimizer over the data-parallel buckets, or an ordinary one over `chunks`."""
    if distributed:
        return DistributedOptimizer(ddps, make_optimizer, state, offload)
    return LocalOptimizer(chunks, make_optimizer, state)
