"""Weight initialisation (Megatron-LM / GPT-NeoX).

All weights ~ normal(0, std); the two projections that write into the residual stream (attention
output and MLP output) use std / sqrt(2 x num_layers), so that the variance of the residual stream
stays roughly constant with depth (GPT-2 paper, section 2.3).
"""

import math

import torch


def normal_init(std: float):
    def init_(tensor: torch.Tensor) -> None:
        torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init(std: float, num_layers: int):
    return normal_init(std / math.sqrt(2.0 * num_layers))
