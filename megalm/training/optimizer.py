"""Optimizers: AdamW (decoupled weight decay) and Lion, with no decay on norms and biases.

Parameters with one dimension (norm weights, biases) are put in a group with weight_decay 0, as
in Megatron-LM and nanoGPT: decaying a norm's gain towards zero only fights the normalisation.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import nn

from megalm.config import OptimConfig
from megalm.parallel.distributed_optimizer import decays


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(beta1 * m + (1 - beta1) * g);  p -= lr * (update + wd * p);
    m = beta2 * m + (1 - beta2) * g.  Typical lr is 3-10x smaller than AdamW's.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            moms = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moms.append(state["exp_avg"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            updates = torch._foreach_lerp(moms, grads, 1.0 - beta1)
            torch._foreach_sign_(updates)
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            torch._foreach_lerp_(moms, grads, 1.0 - beta2)
        return loss


def build_optimizer(params: Iterable[Tuple[torch.Tensor, nn.Parameter]], config: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW or Lion over `params`: (tensor to update, the model parameter it belongs to) pairs.

    The tensor is the parameter itself for an ordinary optimizer, or a rank's slice of it under the
    distributed optimizer; the model parameter decides its weight decay. Two groups, decay then
    no decay (checkpoints written before states were keyed by name rely on that order)."""
    decay, no_decay = [], []
    for tensor, param in params:
        (decay if decays(param) else no_decay).append(tensor)
    groups = [dict(params=decay, weight_decay=config.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if config.optimizer == "lion":
        return Lion(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
    # fused AdamW is fastest on CUDA; foreach elsewhere.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, fused=fused, foreach=None if fused else True)
