"""Tensor-parallel layers: the building blocks every model layer is made of.

Megatron's names and weight layouts (Shoeybi et al. 2019):

- `ColumnParallelLinear` splits its output features across the tensor-parallel ranks; its input is
  replicated (or, with sequence parallelism, all-gathered along the sequence);
- `RowParallelLinear` splits its input features; the partial outputs are summed by an all-reduce
  (or reduce-scattered along the sequence with sequence parallelism), then the bias is added;
- `VocabParallelEmbedding` splits the vocabulary rows; each rank looks up the tokens it owns and
  the all-reduce fills in the rest.

A column-parallel layer followed by a row-parallel one (attention: qkv -> proj; MLP: fc1 -> fc2)
needs one collective forward and one backward. With one tensor-parallel rank each class is exactly
the plain layer it generalises: same parameters, same names, no collective, no extra copy.

Weights are `[out_features, in_features]` as in `torch.nn.Linear`. Every rank initialises the full
("master") weight from the same random stream and keeps its shard, so a model built for TP=N holds
exactly the shards of the model built for TP=1. Sharded parameters carry `partition_dim` and
`partition_stacked` (see `shard` / `merge_shards`), which is all a checkpoint resharder needs.
Replicated parameters whose gradient is only partial under sequence parallelism (norms, row-parallel
biases, position embeddings) carry `sequence_parallel = True`: their gradients are all-reduced over
the tensor-parallel group after the backward pass (`megalm.parallel.data_parallel`).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalm.parallel import mappings
from megalm.parallel.fp8 import Fp8Recipe, Fp8State, fp8_linear
from megalm.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], None]


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stacked: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice of `full` along `dim`.

    `stacked` > 1 means the dimension is a concatenation of equal blocks that are split one by
    one: SwiGLU's fc1 is [gate; up], so rank r holds [gate_r; up_r], not half of [gate; up].
    """
    if size == 1:
        return full
    blocks = full.chunk(stacked, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim)


def merge_shards(shards: List[torch.Tensor], dim: int, stacked: int = 1) -> torch.Tensor:
    """The inverse of `shard`: the full tensor from every rank's slice, in rank order."""
    if len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(stacked, dim=dim) for s in shards]
    return torch.cat([torch.cat([blocks[j] for blocks in per_rank], dim=dim) for j in range(stacked)], dim=dim)


def mark_sharded(param: nn.Parameter, dim: int, stacked: int = 1) -> None:
    param.partition_dim = dim
    param.partition_stacked = stacked


def mark_sequence_parallel(module: nn.Module, parallel: ParallelState) -> None:
    """Flag the replicated parameters of a module that runs on sequence shards."""
    if parallel.sequence_parallel:
        for p in module.parameters():
            p.sequence_parallel = True


def _init_shard(param: nn.Parameter, init_method: InitMethod, full_shape, dim: int, stacked: int,
                parallel: ParallelState) -> None:
    size = parallel.tensor_model_parallel_size
    if size == 1:
        init_method(param.data)
        return
    full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
    init_method(full)
    with torch.no_grad():
        param.copy_(shard(full, dim, parallel.tensor_model_parallel_rank, size, stacked))


class _ParallelLinear(nn.Module):
    partition_dim = 0  # of the weight
    # The dims of x [m, in], w [out, in] and the output gradient [m, out] that TP splits (megalm.parallel.fp8).
    fp8_sharded_dims = (None, None, None)

    def __init__(self, input_size: int, output_size: int, bias: bool, init_method: InitMethod,
                 parallel: Optional[ParallelState] = None, stacked: int = 1, fp8: Optional[Fp8Recipe] = None):
        super().__init__()
        parallel = parallel or ParallelState()
        self.parallel = parallel
        self.tp = parallel.tensor_model_parallel_size
        self.group = parallel.tensor_model_parallel_group
        self.sequence_parallel = parallel.sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        self.stacked = stacked
        shape = [output_size, input_size]
        if shape[self.partition_dim] % (self.tp * stacked):
            raise ValueError(f"{type(self).__name__}: dimension {self.partition_dim} of the weight "
                             f"({shape[self.partition_dim]}) is not divisible by the tensor-parallel "
                             f"size ({self.tp}) x {stacked}")
        local = list(shape)
        local[self.partition_dim] //= self.tp
        self.weight = nn.Parameter(torch.empty(local))
        mark_sharded(self.weight, self.partition_dim, stacked)
        bias_size = local[0]
        self.bias = nn.Parameter(torch.zeros(bias_size)) if bias else None
        self.init_method = init_method
        # FP8 GEMMs (--fp8-format): the scaling state; None runs F.linear in the autocast dtype.
        self.fp8 = Fp8State(fp8, self.group, self.fp8_sharded_dims) if fp8 is not None else None
        self.reset_parameters()

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, self.weight, bias)
        return fp8_linear(x, self.weight, bias, self.fp8)

    def reset_parameters(self) -> None:
        _init_shard(self.weight, self.init_method, [self.output_size, self.input_size], self.partition_dim,
                    self.stacked, self.parallel)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"
                + (f", tensor_parallel={self.tp}" if self.tp > 1 else ""))


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by rows (output features) across tensor-parallel ranks.

    Input [b, s, in] replicated ([b, s / TP, in] with sequence parallelism) -> output
    [b, s, out / TP] (or [b, s, out] with `gather_output`).
    """

    partition_dim = 0
    fp8_sharded_dims = (None, 0, 1)

    def __init__(self, input_size: int, output_size: int, bias: bool, init_method: InitMethod,
                 parallel: Optional[ParallelState] = None, stacked: int = 1, gather_output: bool = False,
                 fp8: Optional[Fp8Recipe] = None):
        super().__init__(input_size, output_size, bias, init_method, parallel, stacked, fp8)
        self.gather_output = gather_output
        if self.bias is not None:
            mark_sharded(self.bias, 0, stacked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return self._linear(x, self.bias)
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.group)  # [b, s, in]
        else:
            x = mappings.copy_to_tensor_parallel_region(x, self.group)
        y = self._linear(x, self.bias)  # [b, s, out / TP]
        return mappings.gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by columns (input features); partial outputs are summed.

    Input [b, s, in / TP] (the output of a column-parallel layer) -> output [b, s, out]
    ([b, s / TP, out] with sequence parallelism).
    """

    partition_dim = 1
    fp8_sharded_dims = (1, 1, None)

    def __init__(self, input_size: int, output_size: int, bias: bool, init_method: InitMethod,
                 parallel: Optional[ParallelState] = None, fp8: Optional[Fp8Recipe] = None):
        super().__init__(input_size, output_size, bias, init_method, parallel, fp8=fp8)
        if self.bias is not None and self.sequence_parallel:
            self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return self._linear(x, self.bias)
        y = self._linear(x, None)  # [b, s, out] partial sum over this rank's input features
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = mappings.reduce_from_tensor_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split across tensor-parallel ranks.

    [b, s] token ids -> [b, s, h] ([b, s / TP, h] with sequence parallelism).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod,
                 parallel: Optional[ParallelState] = None):
        super().__init__()
        parallel = parallel or ParallelState()
        self.parallel = parallel
        self.tp = parallel.tensor_model_parallel_size
        self.group = parallel.tensor_model_parallel_group
        self.sequence_parallel = parallel.sequence_parallel
        if num_embeddings % self.tp:
            raise ValueError(f"vocabulary of {num_embeddings} rows is not divisible by the tensor-parallel "
                             f"size {self.tp} (pad it with megalm.config.pad_vocab_size)")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_local = num_embeddings // self.tp
        self.vocab_start = parallel.tensor_model_parallel_rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim))
        mark_sharded(self.weight, 0)
        self.init_method = init_method
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_shard(self.weight, self.init_method, [self.num_embeddings, self.embedding_dim], 0, 1, self.parallel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_start + self.num_local)
        local = torch.where(outside, 0, tokens - self.vocab_start)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, h] partial
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(x, self.group)
        return mappings.reduce_from_tensor_parallel_region(x, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (f", tensor_parallel={self.tp}" if self.tp > 1 else "")


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output layer: [.., h] x [V, h]^T -> [.., V] (the local vocabulary slice under TP)."""
    return F.linear(hidden, weight, bias)
