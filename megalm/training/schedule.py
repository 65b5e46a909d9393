"""Learning-rate schedules: linear warm-up, then constant, linear, cosine or WSD decay to min_lr.

WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): hold the peak rate, then decay during the last
`wsd_decay_iters` iterations before `decay_iters`. Past `decay_iters` the rate stays at min_lr.
The schedule is a pure function of the iteration, so resuming needs only the iteration number.
"""

from __future__ import annotations

import math

from megalm.config import OptimConfig


def _anneal(style: str, progress: float, lr: float, min_lr: float) -> float:
    """progress in [0, 1]: 0 gives lr, 1 gives min_lr."""
    if style == "linear":
        coeff = 1.0 - progress
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    elif style == "exponential":
        # min_lr at the end; if min_lr is 0 fall back to a decay to 1e-3 of the peak.
        floor = (min_lr / lr) if min_lr > 0 else 1e-3
        return max(min_lr, lr * floor ** progress) if progress < 1 else min_lr
    elif style == "minus_sqrt":
        coeff = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay style {style!r}")
    return min_lr + coeff * (lr - min_lr)


class LRScheduler:
    def __init__(self, optimizer, config: OptimConfig):
        self.optimizer = optimizer
        self.lr, self.min_lr = config.lr, config.min_lr
        self.warmup_iters = config.lr_warmup_iters
        self.decay_iters = config.lr_decay_iters
        self.style = config.lr_decay_style
        span = max(self.decay_iters - self.warmup_iters, 0)
        self.wsd_decay_iters = config.lr_wsd_decay_iters if config.lr_wsd_decay_iters is not None \
            else max(1, span // 10)
        self.wsd_style = config.lr_wsd_decay_style
        self.iteration = 0

    def get_lr(self, iteration: int) -> float:
        """Learning rate used by the optimizer step that completes iteration `iteration + 1`."""
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if iteration >= self.decay_iters:
            return self.min_lr
        if self.style == "WSD":
            decay_start = self.decay_iters - self.wsd_decay_iters
            if iteration < decay_start:
                return self.lr
            return _anneal(self.wsd_style, (iteration - decay_start) / self.wsd_decay_iters,
                           self.lr, self.min_lr)
        span = self.decay_iters - self.warmup_iters
        return _anneal(self.style, (iteration - self.warmup_iters) / span, self.lr, self.min_lr)

    def step(self) -> float:
        """Set the optimizer's rate for the coming step and advance; returns the rate used."""
        lr = self.get_lr(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        self.iteration += 1
        return lr

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
