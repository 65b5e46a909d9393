"""Mixed precision: autocast for bf16/fp16 and Megatron-style dynamic loss scaling for fp16.

Weights, gradients and optimizer state stay fp32; matmuls run in the low-precision type under
autocast. fp16's narrow range needs the loss multiplied by a scale before backward so that small
gradients do not flush to zero. The dynamic scaler halves the scale after `hysteresis` steps whose
gradients overflowed (those steps are skipped), and doubles it after `window` clean steps.
"""

from __future__ import annotations

import contextlib

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

