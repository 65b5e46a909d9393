"""The global gradient norm across every parallel dimension, clipping, and inf/NaN detection.

The norm is that of the single-process model's gradient, so clipping acts the same whatever the
layout. Each rank sums the squares of the gradients it holds, counting every element of the model
exactly once:

- a tensor-parallel shard (`partition_dim` set) is counted by its rank: the shards are disjoint;
- a parameter replicated across tensor-parallel ranks (norms, row-parallel biases, position
  embeddings) is counted by tensor-parallel rank 0 only;
- the output layer's copy of a tied embedding on the last pipeline stage is not counted: the first
  stage counts the embedding;
- with the distributed optimizer each data-parallel rank counts only its shard of each bucket.
- with expert parallelism each rank counts its own experts, and the parameters replicated over the
  expert-parallel group are counted by its rank 0 (the sums are then all-reduced over that group);
  with the distributed optimizer too, every rank counts its pieces: the replicated parameters are
  sharded over the data-parallel group, the experts over the expert-data-parallel group.

The sums are all-reduced over the group that covers the distinct parts: the model-parallel group
(tensor x pipeline), with expert parallelism the model- and expert-parallel group (tensor x
pipeline x expert: one copy of every expert shard, `megalm.parallel.expert`), with the
distributed optimizer the whole world. A non-finite norm, identical on every rank
after the all-reduce, means the step is skipped everywhere.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megalm.parallel.state import ParallelState


def counts_for_norm(param: torch.nn.Parameter, state: ParallelState, sharded: bool = False) -> bool:
    """Does this rank count `param`'s gradient (`sharded`: its distributed-optimizer piece of it)
    in the global norm (see the module docstring)?"""
    if getattr(param, "shared_embedding", False) and not state.is_pipeline_first_stage:
        return False
    if state.expert_model_parallel_size > 1 and not getattr(param, "expert_parallel", False) and not sharded:
        # Replicated over the expert-parallel group, whose ranks sum their squares: count it once.
        if state.expert_model_parallel_rank != 0:
            return False
    return hasattr(param, "partition_dim") or state.tensor_model_parallel_rank == 0


@torch.no_grad()
def clip_grad_norm(grads: List[torch.Tensor], norm_grads: List[torch.Tensor], inv_scale: float, max_norm: float,
                   group: Optional[dist.ProcessGroup], device: torch.device) -> Tuple[float, bool]:
    """Divide `grads` by the loss scale, measure the global L2 norm of `norm_grads` summed over
    `group`, and clip `grads` to `max_norm` (0: no clipping).

    Returns (norm before clipping, found_inf). When the norm is not finite nothing is clipped: the
    step will be skipped.
    """
    if inv_scale != 1.0 and grads:
        torch._foreach_mul_(grads, inv_scale)
    if norm_grads:
        squares = torch.stack([n.float() for n in torch._foreach_norm(norm_grads, 2.0)]).square().sum()
    else:
        squares = torch.zeros((), device=device)
    if group is not None:
        dist.all_reduce(squares, group=group)
    total = squares.sqrt().item()
    if not math.isfinite(total):
        return total, True
    if max_norm > 0 and total > max_norm and grads:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total, False
