"""Normalization layers: LayerNorm and RMSNorm, both computed by `megalm.kernels`."""

import torch
from torch import nn

from megalm.config import ModelConfig
from megalm.kernels import layer_norm, rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


def build_norm(config: ModelConfig) -> nn.Module:
    klass = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return klass(config.hidden_size, config.norm_epsilon, config.normalization_backend)
