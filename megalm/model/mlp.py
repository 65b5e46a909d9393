"""The position-wise MLP: GELU (GPT-2) or SwiGLU (Shazeer, 2020; Llama).

With SwiGLU, `linear_fc1` produces the gate and the up projection in one matmul, gate half first
([2 x ffn, h] weight), and `megalm.kernels.swiglu` computes silu(gate) * up. The MLP is split by the
FFN dimension under tensor parallelism: fc1 column-parallel, fc2 row-parallel.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.kernels import swiglu
from megalm.model.init import normal_init, scaled_init
from megalm.parallel.fp8 import Fp8Recipe
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Optional[ParallelState] = None, fp8: Optional[Fp8Recipe] = None):
        super().__init__()
        self.swiglu = config.swiglu
        ffn = config.ffn_size
        std = config.init_method_std
        # Under tensor parallelism each rank holds ffn / TP features; with SwiGLU its fc1 shard is
        # [gate_shard; up_shard] (stacked=2), so silu(gate) * up stays rank-local.
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, 2 * ffn if self.swiglu else ffn,
                                               bias=config.add_bias_linear, init_method=normal_init(std),
                                               parallel=parallel, stacked=2 if self.swiglu else 1, fp8=fp8)
        self.linear_fc2 = RowParallelLinear(ffn, config.hidden_size, bias=config.add_bias_linear,
                                            init_method=scaled_init(std, config.num_layers), parallel=parallel,
                                            fp8=fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h]
        h = self.linear_fc1(x)
        h = swiglu(h) if self.swiglu else F.gelu(h, approximate="tanh")
        return self.linear_fc2(h)
