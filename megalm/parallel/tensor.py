"""Tensor-parallel layers: the building blocks every model layer is made of.

Megatron's names and weight layouts: a column-parallel linear splits its output features across
tensor-parallel ranks, a row-parallel linear splits its input features and sums the partial
outputs, a vocab-parallel embedding splits the vocabulary. With one tensor-parallel rank, which is
what this module provides, each is the plain layer it generalises: the model code, the parameter
names (`weight`, `bias`) and the checkpoint layout stay the same when the splits are added.

Weights are `[out_features, in_features]` as in `torch.nn.Linear`; `init_method(tensor)` fills
them in place (see `megalm.model.init`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

InitMethod = Callable[[torch.Tensor], None]


class _ParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, init_method: InitMethod):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None
        self.init_method = init_method
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_method(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, in] -> [b, s, out]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by rows (output features) across tensor-parallel ranks."""


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by columns (input features); partial outputs are summed."""


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split across tensor-parallel ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.init_method = init_method
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_method(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [b, s] -> [b, s, h]
        return F.embedding(tokens, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output layer: [.., h] x [V, h]^T -> [.., V] (the local vocabulary slice under TP)."""
    return F.linear(hidden, weight, bias)
