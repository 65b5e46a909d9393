"""Top-k routing for a mixture of experts: scores, top-k selection and routing weights in one op.

For router logits z [t, E] (fp32):

    s = softmax(z)            (score_function "softmax")   or   s = sigmoid(z)   ("sigmoid")
    idx = top-k indices of s (+ bias, when given) per token, highest first
    g_j = s[idx_j]
    w_j = g_j / sum_i g_i     (when normalize; else w_j = g_j)
    w_j = w_j * scaling

The optional `bias` [E] (aux-loss-free load balancing, DeepSeek-V3) only changes which experts are
chosen: the weights are the unbiased scores of the chosen experts, and no gradient reaches the bias.
Group-limited routing (DeepSeek-V2/V3, `num_groups`, `group_topk`) also acts on the choice only:
the E experts form G groups of E / G, a group's score is the sum of its top k / group_topk choice
scores (s + bias), only the best `group_topk` groups stay candidates. It is computed with torch ops
and handed to the kernels as a per-token bias [t, E] (-inf outside the kept groups).

Returns (weights [t, k] fp32, indices [t, k] int64, scores [t, E] fp32). `scores` is returned so the
load-balancing loss can use the full distribution; gradients flow into z from both the weights and
the scores. The Triton path handles one token per program, the E scores in registers; its backward
recomputes s from z instead of saving it:

    dg_j = scaling * (dw_j - sum_i dw_i w'_i) / G   (normalize; w' = g / G, G = sum g)   else scaling * dw_j
    ds = dscores + scatter(idx, dg)
    dz = s * (ds - sum(ds * s))   (softmax)   or   ds * s * (1 - s)   (sigmoid)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megalm.kernels import dispatch

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def router_scores(logits: Tensor, score_function: str) -> Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if score_function == "softmax" else torch.sigmoid(logits)


def topk_router_reference(logits: Tensor, topk: int, score_function: str = "softmax", normalize: bool = False,
                          scaling: float = 1.0, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    scores = router_scores(logits, score_function)
    if bias is None:
        gates, indices = torch.topk(scores, topk, dim=-1)
    else:
        indices = torch.topk(scores + bias.detach().float(), topk, dim=-1).indices
        gates = scores.gather(1, indices)
    if normalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates * scaling, indices, scores


def group_limited_bias(scores: Tensor, bias: Optional[Tensor], num_groups: int, group_topk: int,
                       topk: int) -> Tensor:
    """The per-token bias [t, E] that restricts the choice to each token's best `group_topk` groups
    (adding `bias` [E] when given)."""
    choice = scores.detach().float()
    if bias is not None:
        choice = choice + bias.detach().float()
    t, e = choice.shape
    per_group = e // num_groups
    group_scores = choice.view(t, num_groups, per_group).topk(topk // group_topk, dim=-1).values.sum(-1)
    kept = group_scores.topk(group_topk, dim=-1).indices  # [t, group_topk]
    keep = torch.zeros(t, num_groups, dtype=torch.bool, device=choice.device).scatter_(1, kept, True)
    offset = torch.zeros_like(choice).masked_fill_(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    return offset if bias is None else offset + bias.detach().float()


@torch.library.custom_op("megalm::moe_router_forward", mutates_args=())
def _router_forward(logits: Tensor, topk: int, sigmoid: bool, normalize: bool,
                    scaling: float, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from megalm.kernels._triton.moe_router import router_forward
    return router_forward(logits, topk, sigmoid, normalize, scaling, bias)


@_router_forward.register_fake
def _(logits, topk, sigmoid, normalize, scaling, bias):
    t = logits.shape[0]
    return (logits.new_empty(t, topk, dtype=torch.float32), logits.new_empty(t, topk, dtype=torch.int64),
            logits.new_empty(logits.shape, dtype=torch.float32))


@torch.library.custom_op("megalm::moe_router_backward", mutates_args=())
def _router_backward(logits: Tensor, indices: Tensor, d_weights: Tensor, d_scores: Tensor, sigmoid: bool,
                     normalize: bool, scaling: float) -> Tensor:
    from megalm.kernels._triton.moe_router import router_backward
    return router_backward(logits, indices, d_weights, d_scores, sigmoid, normalize, scaling)


@_router_backward.register_fake
def _(logits, indices, d_weights, d_scores, sigmoid, normalize, scaling):
    return torch.empty_like(logits, dtype=torch.float32)


class TopKRouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk, sigmoid, normalize, scaling, bias=None):
        logits = logits.contiguous()
        if bias is not None:
            bias = bias.detach().float().contiguous()
        weights, indices, scores = _router_forward(logits, topk, sigmoid, normalize, scaling, bias)
        ctx.save_for_backward(logits, indices)
        ctx.options = (sigmoid, normalize, scaling)
        ctx.mark_non_differentiable(indices)
        return weights, indices, scores

    @staticmethod
    def backward(ctx, d_weights, d_indices, d_scores):
        logits, indices = ctx.saved_tensors
        if d_weights is None:
            d_weights = torch.zeros(indices.shape, dtype=torch.float32, device=logits.device)
        if d_scores is None:
            d_scores = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        d_logits = _router_backward(logits, indices, d_weights.float().contiguous(), d_scores.float().contiguous(),
                                    *ctx.options)
        return d_logits.to(logits.dtype), None, None, None, None, None


def _unsupported(logits: Tensor):
    def check(name: str) -> Optional[str]:
        reason = dispatch.triton_unsupported_device(logits)
        if reason is not None:
            return reason
        if logits.dim() != 2 or logits.shape[0] == 0:
            return f"logits must be a non-empty [tokens, experts] tensor, got shape {tuple(logits.shape)}"
        if logits.dtype != torch.float32:
            return f"router logits must be float32, got {logits.dtype}"
        if logits.shape[1] > 4096:
            return f"at most 4096 experts, got {logits.shape[1]}"
        return None
    return check


def topk_router(logits: Tensor, topk: int, score_function: str = "softmax", normalize: bool = False,
                scaling: Optional[float] = None, backend: str = "auto", bias: Optional[Tensor] = None,
                num_groups: Optional[int] = None, group_topk: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """logits [t, E] -> (weights [t, k] fp32, indices [t, k] int64, scores [t, E] fp32); see the module doc."""
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    e = logits.shape[-1]
    if bias is not None and bias.shape != (e,):
        raise ValueError(f"the expert bias must have one entry per expert ({e}), got {tuple(bias.shape)}")
    if num_groups:
        if e % num_groups or not 1 <= group_topk <= num_groups or not group_topk <= topk <= group_topk * (e // num_groups):
            raise ValueError(f"group-limited routing needs E ({e}) divisible by the groups ({num_groups}), "
                             f"1 <= group_topk ({group_topk}) <= groups and group_topk <= k ({topk}) <= "
                             f"group_topk x E / groups")
        bias = group_limited_bias(router_scores(logits.detach(), score_function), bias, num_groups, group_topk, topk)
    scaling = 1.0 if scaling is None else float(scaling)
    impl = dispatch.select("moe_router", backend, logits.device, ("triton",), _unsupported(logits))
    if impl == "reference":
        return topk_router_reference(logits, topk, score_function, normalize, scaling, bias)
    return TopKRouterFunction.apply(logits, topk, score_function == "sigmoid", normalize, scaling, bias)
