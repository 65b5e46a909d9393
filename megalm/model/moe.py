"""Mixture of experts: a router, fine-grained SwiGLU experts and optional shared experts.

DeepSeek-MoE's layer (Dai et al., 2024), which contains Mixtral's and Switch's as special cases:

    y = shared(x) + sum_{j < k} w_j(x) * expert_{i_j(x)}(x)

- `TopKRouter`: logits = x W_r^T in fp32; scores = softmax or sigmoid of the logits; the top-k
  experts of each token and their weights (optionally renormalised to sum to 1, and scaled)
  (`megalm.kernels.topk_router`). With `--moe-router-enable-expert-bias` a per-expert bias joins
  the scores for the choice only, and `update_expert_bias` moves it toward balance after each step
  (DeepSeek-V3's aux-loss-free balancing); `--moe-router-num-groups` limits each token to its best
  groups of experts (DeepSeek-V2/V3).
- Dispatch: the token rows go to expert-contiguous order (`megalm.kernels.permute`), dropless by
  default; with `--moe-expert-capacity-factor` every expert keeps at most its capacity, dropping
  its lowest-probability assignments. With expert parallelism the rows then travel to the ranks
  that hold their experts by all-to-all (`megalm.parallel.expert`), and back.
- `GroupedExperts`: every expert is a SwiGLU MLP; all experts run as two grouped GEMMs
  (`megalm.kernels.grouped_gemm`) with weights stacked per expert, `weight1` [E, 2 x ffn, h]
  (gate half first) and `weight2` [E, h, ffn], the layout of Hugging Face's fused experts.
- Combine: each token's expert outputs, weighted by its routing weights (`megalm.kernels.unpermute`).
- Shared experts: a dense SwiGLU MLP of `--moe-shared-expert-intermediate-size` every token uses,
  optionally scaled by a per-token sigmoid gate (`--moe-shared-expert-gate`, Qwen2-MoE).
- Tensor parallelism: each expert split like the dense MLP (fc1 by output features, fc2 by input
  features), the router replicated and run on all the tokens (see `MoELayer.forward`).

Training losses, per MoE layer, computed on this rank's tokens of the micro-batch:

    aux = coeff x E x sum_i f_i P_i     f_i = tokens routed to i / (tokens x k),  P_i = mean score of i
    z   = coeff x mean_t logsumexp(logits_t)^2

(Switch Transformer / GShard; ST-MoE). With sigmoid scores P uses the scores normalised to sum to 1
per token. The model adds them to the language-model loss (`GPTModel.forward`), so they are
averaged over micro-batches and data-parallel ranks exactly as the loss is; a pipeline stage before
the last attaches them to its output activations instead (`AuxLossAutoScaler`). Each layer also keeps
statistics for the logs (`megalm.training.metrics.moe_statistics`): tokens per expert, aux and z
losses, dropped assignments, summed since the last read.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.kernels import expert_rows, grouped_gemm, permute, swiglu, topk_router, unpermute
from megalm.model.init import normal_init, scaled_init
from megalm.model.mlp import MLP
from megalm.parallel import mappings
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import mark_sequence_parallel, mark_sharded, shard


def load_balancing_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int,
                        score_function: str) -> torch.Tensor:
    """E x sum_i f_i P_i for scores [t, E] and the top-k choices indices [t, k] (Switch Transformer eq. 4)."""
    t, k = indices.shape
    probs = scores if score_function == "softmax" else scores / scores.sum(-1, keepdim=True)
    fraction = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / (t * k)
    return num_experts * torch.sum(fraction * probs.mean(0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2 (ST-MoE): keeps the router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class TopKRouter(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.topk = config.num_experts, config.moe_router_topk
        self.score_function = config.moe_router_score_function
        self.normalize = config.moe_router_norm_topk_prob
        self.scaling = config.moe_router_topk_scaling_factor
        self.num_groups, self.group_topk = config.moe_router_num_groups, config.moe_router_group_topk
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        normal_init(config.init_method_std)(self.weight)
        # Aux-loss-free load balancing (DeepSeek-V3): a bias added to the scores for the top-k
        # choice only. Not trained by the optimizer (no gradient reaches it): `update_expert_bias`
        # moves it after every step. A parameter without gradient rather than a buffer, so that
        # checkpoints, resharding and the start-up broadcast carry it like the router's weight.
        self.expert_bias = None
        self.bias_update_rate = config.moe_router_bias_update_rate
        if config.moe_router_enable_expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
            self.register_buffer("tokens_since_update", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: torch.Tensor):
        """x [t, h] -> (logits [t, E] fp32, weights [t, k] fp32, indices [t, k], scores [t, E] fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        weights, indices, scores = topk_router(logits, self.topk, self.score_function, self.normalize, self.scaling,
                                               bias=self.expert_bias, num_groups=self.num_groups,
                                               group_topk=self.group_topk)
        return logits, weights, indices, scores


class GroupedExperts(nn.Module):
    """The SwiGLU experts `first_expert .. first_expert + num_local - 1` of a layer with `num_experts`.

    Every rank draws the weights of all experts from the same stream and keeps its own, so an
    expert-parallel model holds exactly the experts of the single-process one.
    """

    def __init__(self, config: ModelConfig, num_local: int, first_expert: int = 0,
                 parallel: Optional[ParallelState] = None):
        super().__init__()
        parallel = parallel or ParallelState()
        e, h, f = config.num_experts, config.hidden_size, config.moe_ffn_size
        tp, tp_rank = parallel.tensor_model_parallel_size, parallel.tensor_model_parallel_rank
        if f % tp:
            raise ValueError(f"the expert hidden size ({f}) is not divisible by the tensor-parallel size ({tp})")
        std = config.init_method_std
        weight1, weight2 = torch.empty(e, 2 * f, h), torch.empty(e, h, f)
        normal_init(std)(weight1)
        scaled_init(std, config.num_layers)(weight2)
        local = slice(first_expert, first_expert + num_local)
        # Expert tensor parallelism: each expert split like the dense MLP, fc1 by output features
        # (gate and up halves split separately) and fc2 by input features.
        self.weight1 = nn.Parameter(shard(weight1[local], 1, tp_rank, tp, stacked=2).clone())  # [E_local, 2 ffn / TP, h]
        self.weight2 = nn.Parameter(shard(weight2[local], 2, tp_rank, tp).clone())  # [E_local, h, ffn / TP]
        mark_sharded(self.weight1, 1, stacked=2)
        mark_sharded(self.weight2, 2)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [m, h], rows grouped by local expert (tokens_per_expert [E_local]) -> [m, h]."""
        return swiglu_experts(x, self.weight1, self.weight2, tokens_per_expert)


def swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Every expert's SwiGLU MLP on its rows of x [m, h] as two grouped GEMMs: w1 [E, 2 ffn, h] (gate
    half first), w2 [E, h, ffn]; in the autocast dtype under autocast."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
    elif x.dtype != w1.dtype:
        x = x.to(w1.dtype)
    h = grouped_gemm(x, w1, tokens_per_expert)  # [m, 2 ffn]
    return grouped_gemm(swiglu(h), w2, tokens_per_expert)  # [m, h]


class MoELayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int, parallel: Optional[ParallelState] = None):
        super().__init__()
        parallel = parallel or ParallelState()
        self.layer_number = layer_number
        self.num_experts, self.topk = config.num_experts, config.moe_router_topk
        self.score_function = config.moe_router_score_function
        self.aux_loss_coeff, self.z_loss_coeff = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
        self.capacity_factor = config.moe_expert_capacity_factor
        self.pad_to_capacity = config.moe_pad_expert_input_to_capacity
        self.expert_parallel = parallel.expert_model_parallel_size
        self.expert_group = parallel.expert_model_parallel_group
        num_local = config.num_experts // self.expert_parallel
        ep_rank = parallel.expert_model_parallel_rank if self.expert_parallel > 1 else 0
        self.tensor_group = parallel.tensor_model_parallel_group if parallel.tensor_model_parallel_size > 1 else None
        self.sequence_parallel = parallel.sequence_parallel and self.tensor_group is not None
        self.router = TopKRouter(config)
        self.experts = GroupedExperts(config, num_local, ep_rank * num_local, parallel)
        for p in self.experts.parameters():
            p.expert_parallel = True  # reduced over the expert-data-parallel group (megalm.parallel.expert)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            shared = dataclasses.replace(config, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
            self.shared_experts = MLP(shared, parallel)
        self.shared_expert_gate = None
        if config.moe_shared_expert_gate and self.shared_experts is not None:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)  # Qwen2-MoE
            normal_init(config.init_method_std)(self.shared_expert_gate.weight)
            mark_sequence_parallel(self.shared_expert_gate, parallel)  # it sees this rank's sequence shard
        self.aux_loss: Optional[torch.Tensor] = None  # this forward's aux + z losses (training only)
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.stats = {"tokens_per_expert": torch.zeros(self.num_experts, dtype=torch.float64),
                      "aux_loss": torch.zeros((), dtype=torch.float64), "z_loss": torch.zeros((), dtype=torch.float64),
                      "dropped": torch.zeros((), dtype=torch.float64), "calls": 0}

    def _record(self, counts: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, dropped) -> None:
        s = self.stats
        if s["tokens_per_expert"].device != counts.device:
            s.update({key: value.to(counts.device) for key, value in s.items() if torch.is_tensor(value)})
        s["tokens_per_expert"] += counts.detach()
        s["aux_loss"] += aux.detach()
        s["z_loss"] += z.detach()
        if dropped is not None:
            s["dropped"] += dropped
        s["calls"] += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h] ([b, s / TP, h] with SP)
        # Tensor parallelism: every rank routes all the tokens of the micro-batch with its replicated
        # router (so the routing, the aux losses and the router's gradient are those of one process)
        # and runs its 1 / TP slice of every expert's hidden features; the experts' partial outputs
        # are summed before the combine, so d(routing weights) is complete on every rank too, and
        # only the experts' input gradient, a partial sum, is all-reduced.
        local = x
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.tensor_group, tensor_parallel_output_grad=False)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [t, h]
        logits, weights, indices, scores = self.router(tokens)
        routing = expert_rows(indices, self.num_experts, scores.gather(1, indices), self.capacity_factor,
                              self.pad_to_capacity)
        self.aux_loss = None
        if self.training:
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
            if self.router.expert_bias is not None:  # the load behind the next bias update
                self.router.tokens_since_update += counts
            aux = load_balancing_loss(scores, indices, self.num_experts, self.score_function)
            z = z_loss(logits)
            self._record(counts, aux, z, routing.dropped)
            if self.aux_loss_coeff > 0 or self.z_loss_coeff > 0:
                self.aux_loss = self.aux_loss_coeff * aux + self.z_loss_coeff * z
        expert_input = tokens
        if torch.is_autocast_enabled(tokens.device.type):  # move the rows in the compute dtype
            expert_input = tokens.to(torch.get_autocast_dtype(tokens.device.type))
        if self.tensor_group is not None:
            expert_input = mappings.copy_to_tensor_parallel_region(expert_input, self.tensor_group)
        rows = permute(expert_input, routing)  # [num_rows, h], expert-contiguous
        if self.expert_parallel > 1:
            from megalm.parallel.expert import run_expert_parallel
            out_rows = run_expert_parallel(self.experts, rows, routing.tokens_per_expert, self.expert_group)
        else:
            out_rows = self.experts(rows, routing.tokens_per_expert)
        if self.tensor_group is not None:
            out_rows = mappings.reduce_from_tensor_parallel_region(out_rows, self.tensor_group)  # [num_rows, h]
        out = unpermute(out_rows, routing, weights).view(shape)  # [b, s, h]
        if self.sequence_parallel:
            out = mappings.scatter_to_sequence_parallel_region(out, self.tensor_group)  # [b, s / TP, h]
        if self.shared_experts is not None:  # tensor-parallel like the dense MLP, on the layer's input
            shared = self.shared_experts(local)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(local)) * shared
            out = out + shared
        return out


class AuxLossAutoScaler(torch.autograd.Function):
    """Attach a pipeline stage's aux losses to its output activations (Megatron's MoEAuxLossAutoScaler).

    A stage before the last returns activations, not a loss, so its MoE layers' aux and z losses
    cannot join the loss the backward starts from. Forward returns the activations unchanged;
    backward passes their gradient through and gives the aux loss the gradient the last stage's
    loss gets, `loss_scale` (the loss scale / number of micro-batches, set by the trainer before
    each step), so every stage's router receives its aux gradient without the scalar being sent
    through the pipeline.
    """

    loss_scale = 1.0

    @staticmethod
    def forward(ctx, activations: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return activations

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, AuxLossAutoScaler.loss_scale)


def moe_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def update_expert_bias(models, group=None) -> None:
    """Aux-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): after a step, move each expert's
    bias by `--moe-router-bias-update-rate` up if it received fewer tokens than the layer's mean and
    down if more, counting the tokens of every micro-batch of the step summed over `group` (the
    data-parallel ranks; the tensor-parallel ranks route the same tokens and update alike).
    Collective over `group`; nothing to do without the flag."""
    routers = [m.router for model in models for m in moe_layers(model) if m.router.expert_bias is not None]
    if not routers:
        return
    counts = torch.stack([r.tokens_since_update for r in routers])  # [layers, E]
    if group is not None:
        torch.distributed.all_reduce(counts, group=group)
    for router, c in zip(routers, counts):
        router.expert_bias.add_(torch.sign(c.mean() - c) * router.bias_update_rate)
        router.tokens_since_update.zero_()


def moe_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The sum of the aux and z losses of `model`'s MoE layers in the last forward (None if none)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
