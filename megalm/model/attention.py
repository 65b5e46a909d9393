"""Causal self-attention: multi-head or grouped-query, with an optional KV cache.

The fused query/key/value projection uses Megatron's layout: output features are grouped by key/value
head, each group holding its `heads_per_group` query heads, then its key head, then its value head:
[g0: q0 .. q{r-1}, k, v | g1: ...] with r = num_attention_heads / num_query_groups. Splitting the
output features evenly across tensor-parallel ranks then gives each rank whole groups.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megalm.config import ModelConfig
from megalm.kernels import apply_rotary, attention
from megalm.model.init import normal_init, scaled_init
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear


class KVCache:
    """Keys and values of past positions for incremental decoding, one slot per layer.

    Pre-allocated as [b, max_len, num_query_groups, head_dim] per layer; `seq_len` is the number
    of positions already stored (the same for every sequence in the batch).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device=None, dtype=torch.float32):
        shape = (batch_size, max_len, config.query_groups, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.seq_len = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [b, s, g, d] after the cached positions; return all keys and values so far."""
        start, end = self.seq_len, self.seq_len + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, n: int) -> None:
        self.seq_len += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (sequences that are still being generated)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.num_groups = config.query_groups
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_dropout
        self.backend = config.attention_backend
        self.use_rope = config.position_embedding_type == "rope"
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        std = config.init_method_std
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias,
            init_method=normal_init(std))
        self.linear_proj = RowParallelLinear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear,
            init_method=scaled_init(std, config.num_layers))

    def forward(self, x: torch.Tensor, rotary=None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        b, s, _ = x.shape  # [b, s, h]
        r = self.num_heads // self.num_groups
        qkv = self.linear_qkv(x).view(b, s, self.num_groups, r + 2, self.head_dim)
        q = qkv[:, :, :, :r].reshape(b, s, self.num_heads, self.head_dim)  # [b, s, nq, d]
        k = qkv[:, :, :, r]  # [b, s, g, d]
        v = qkv[:, :, :, r + 1]
        if self.use_rope:
            cos, sin = rotary
            q, k = apply_rotary(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)
        dropout_p = self.dropout_p if self.training else 0.0
        out = attention(q, k, v, causal=True, dropout_p=dropout_p, backend=self.backend)
        return self.linear_proj(out.reshape(b, s, self.num_heads * self.head_dim))
