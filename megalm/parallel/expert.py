"""Expert parallelism: each MoE layer's experts split over ranks, tokens exchanged by all-to-all.

Layout (Megatron-LM's): the expert-parallel ranks are carved out of the data-parallel ranks. Within
each data-parallel group (ordered by data-parallel rank), consecutive blocks of EP ranks form an
expert-parallel group; rank i of each block holds experts [i E / EP, (i + 1) E / EP). The ranks
that hold the same experts (same position in their block) form the expert-data-parallel group. With
DP = 4 and EP = 2 on 4 ranks: expert-parallel groups [0, 1] [2, 3]; expert-data-parallel groups
[0, 2] [1, 3].

A data-parallel group has a fixed tensor- and pipeline-parallel rank, and so have the expert groups
carved out of it. With tensor parallelism every expert is split over the tensor-parallel ranks like
the dense MLP, and tensor rank t exchanges tokens with the tensor rank t of the other
expert-parallel ranks, which hold the same slice of their experts: the ranks of a tensor-parallel
group route the same tokens identically, so the rows a rank sends match those its tensor-parallel
peers send, and the partial outputs that come back are summed over the tensor-parallel group as for
the dense MLP. With pipeline parallelism each stage's MoE layers exchange within that stage. TP = 2,
DP = EP = 2 on 4 ranks: tensor groups [0, 1] [2, 3], expert-parallel groups [0, 2] [1, 3]. The
ranks that together hold one copy of every expert shard (tensor x pipeline x expert, for one
expert-data-parallel index) form the model-and-expert-parallel group, over which the gradient norm
is summed (`megalm.parallel.clip_grads`).

Everything else in the model (attention, router, shared experts) stays replicated over the whole
data-parallel group. Gradients therefore reduce in two ways: non-expert parameters over the
data-parallel group as usual; expert parameters (marked `expert_parallel = True`) only over the
expert-data-parallel group, since the other ranks hold other experts. An expert's gradient on its
rank already sums the contributions of the tokens of its whole expert-parallel group (the backward
of the all-to-all brings them back), so dividing by the full data-parallel size and summing over the
expert-data-parallel group gives the data-parallel average, as for every other parameter.

The exchange (`run_expert_parallel`): each rank has its tokens in expert-contiguous rows for all E
experts. The row counts per (destination rank, local expert) are exchanged first with one
all-to-all, the rows follow with `all_to_all_single` and the split sizes derived from the counts
(gloo implements it on CPU, NCCL on GPUs), arriving grouped by (source rank, local expert); a
stable sort regroups them by local expert for the grouped GEMM, and the outputs take the same way
back. Both all-to-alls are autograd functions whose backward is the reverse exchange.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import ConfigError


def expert_layout(data_parallel_groups: List[List[int]], ep: int) -> tuple:
    """(expert-parallel groups, expert-data-parallel groups, model-and-expert-parallel groups) as
    lists of global ranks, from the data-parallel groups (one per tensor and pipeline rank)."""
    ep_groups, edp_groups = [], []
    blocks: List[List[int]] = []  # model-and-expert groups: block j of every data-parallel group
    for ranks in data_parallel_groups:
        if len(ranks) % ep:
            raise ConfigError(f"--expert-model-parallel-size ({ep}) must divide the data-parallel size "
                              f"({len(ranks)}): expert-parallel ranks are carved out of the data-parallel ones")
        ep_groups += [ranks[i:i + ep] for i in range(0, len(ranks), ep)]
        edp_groups += [ranks[i::ep] for i in range(ep)]
        for j, i in enumerate(range(0, len(ranks), ep)):
            if j == len(blocks):
                blocks.append([])
            blocks[j] += ranks[i:i + ep]
    return ep_groups, edp_groups, [sorted(b) for b in blocks]


def build_expert_groups(state, ep: int) -> dict:
    """Create the expert groups of a run (collective: every rank calls it); return this rank's."""
    tp, pp, dp = state.tensor_model_parallel_size, state.pipeline_model_parallel_size, state.data_parallel_size
    dp_groups = [[t + tp * (d + dp * p) for d in range(dp)] for p in range(pp) for t in range(tp)]
    ep_groups, edp_groups, norm_groups = expert_layout(dp_groups, ep)
    mine = {}
    for key, groups in (("expert_model_parallel_group", ep_groups), ("expert_data_parallel_group", edp_groups),
                        ("model_and_expert_parallel_group", norm_groups)):
        for ranks in groups:
            group = dist.new_group(ranks)
            if state.rank in ranks:
                mine[key] = group
    return mine


def expert_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if getattr(p, "expert_parallel", False)]


class _AllToAll(torch.autograd.Function):
    """Rows exchanged by all_to_all_single: send input_splits[r] rows to rank r, receive output_splits[r]."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        x = x.contiguous()
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, dout):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(dout.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list, input_splits: list, group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


def run_expert_parallel(experts: nn.Module, rows: torch.Tensor, tokens_per_expert: torch.Tensor,
                        group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Send `rows` [m, h] (grouped by global expert, tokens_per_expert [E]) to the ranks holding
    their experts, run `experts(x, counts)` on what arrives, and bring the outputs back: [m, h]."""
    ep = dist.get_world_size(group)
    num_local = tokens_per_expert.numel() // ep
    send_counts = tokens_per_expert.to(torch.int64).contiguous()  # [ep x E_local], by destination
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [ep (source) x E_local]
    counts = torch.stack([send_counts, recv_counts]).view(2, ep, num_local).cpu()
    input_splits = counts[0].sum(1).tolist()
    output_splits = counts[1].sum(1).tolist()
    received = all_to_all(rows, output_splits, input_splits, group)  # grouped by (source, local expert)
    local_expert = torch.arange(num_local).repeat(ep)
    segment = torch.repeat_interleave(local_expert, counts[1].reshape(-1)).to(rows.device)
    order = torch.argsort(segment, stable=True)  # -> grouped by (local expert, source)
    out = experts(received.index_select(0, order), counts[1].sum(0).to(rows.device))
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return all_to_all(out.index_select(0, back), input_splits, output_splits, group)
