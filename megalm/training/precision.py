"""Mixed precision: autocast for bf16/fp16 and Megatron-style dynamic loss scaling for fp16.

Weights, gradients and optimizer state stay fp32; matmuls run in the low-precision type under
autocast. fp16's narrow range needs the loss multiplied by a scale before backward so that small
gradients do not flush to zero. The dynamic scaler halves the scale after `hysteresis` steps whose
gradients overflowed (those steps are skipped), and doubles it after `window` clean steps.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Tuple

import torch

from megalm.config import OptimConfig, TrainConfig


def compute_dtype(train: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """A constant scale (1.0 for fp32/bf16, or fp16's --loss-scale)."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler(LossScaler):
    dynamic = True

    def __init__(self, initial_scale: float, min_scale: float, window: int, hysteresis: int):
        super().__init__(initial_scale)
        self.min_scale, self.window, self.hysteresis = float(min_scale), window, hysteresis
        self._hysteresis_left = hysteresis
        self._clean_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps == self.window:
                self._clean_steps = 0
                self._hysteresis_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "hysteresis_left": self._hysteresis_left,
                "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._hysteresis_left = int(state["hysteresis_left"])
        self._clean_steps = int(state["clean_steps"])


def build_loss_scaler(train: TrainConfig, optim: OptimConfig) -> LossScaler:
    if not train.fp16:
        return LossScaler(1.0)
    if optim.loss_scale is not None:
        return LossScaler(optim.loss_scale)
    return DynamicLossScaler(optim.initial_loss_scale, optim.min_loss_scale,
                             optim.loss_scale_window, optim.hysteresis)


@torch.no_grad()
def unscale_and_clip(params: Iterable[torch.Tensor], inv_scale: float,
                     clip: float) -> Tuple[float, bool]:
    """Divide gradients by the loss scale, measure the global L2 norm and clip it to `clip`.

    Returns (norm before clipping, found_inf). When the norm is not finite nothing is clipped:
    the step will be skipped.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, False
    if inv_scale != 1.0:
        torch._foreach_mul_(grads, inv_scale)
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0).item()
    if not math.isfinite(total):
        return total, True
    if clip > 0 and total > clip:
        torch._foreach_mul_(grads, clip / (total + 1e-6))
    return total, False

