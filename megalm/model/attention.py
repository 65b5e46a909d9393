"""Causal self-attention: multi-head or grouped-query, with an optional KV cache.

The fused query/key/value projection uses Megatron's layout: output features are grouped by key/value
head, each group holding its `heads_per_group` query heads, then its key head, then its value head:
[g0: q0 .. q{r-1}, k, v | g1: ...] with r = num_attention_heads / num_query_groups. Splitting the
output features evenly across tensor-parallel ranks then gives each rank whole groups.

A KV cache may hold a left-padded batch (prompts of different lengths generated together): its
`left_padding` gives each row's count of padding slots, the model then numbers each row's positions
from its first real token, and attention masks the padding keys. Each row computes what it would
compute alone.

Packed training rows carry `document_ids` [b, s]: each token attends only to the earlier tokens of
its own document (`megalm.kernels.attention`), so that every document computes what it would
compute alone. They need the whole sequence at once and are refused with a KV cache.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import noop_context_fn

from megalm.config import ModelConfig
from megalm.kernels import apply_rotary, attention
from megalm.model.init import normal_init, scaled_init
from megalm.model.rope import apply_rotary_rows
from megalm.parallel.fp8 import layer_recipe
from megalm.parallel.random import checkpoint_context_fn
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear


class KVCache:
    """Keys and values of past positions for incremental decoding, one slot per layer.

    Pre-allocated as [b, max_len, num_query_groups, head_dim] per layer; `seq_len` is the number
    of positions already stored (the same for every sequence in the batch).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device=None, dtype=torch.float32, tensor_parallel_size: int = 1):
        # Under tensor parallelism a rank's layers hold query_groups / TP groups (SelfAttention).
        shape = (batch_size, max_len, config.query_groups // tensor_parallel_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.seq_len = 0
        self.left_padding: Optional[torch.Tensor] = None  # [b] padding slots before each row's tokens

    def set_left_padding(self, lengths: torch.Tensor) -> None:
        """Mark the first lengths[i] slots of row i as padding (before anything is stored)."""
        self.left_padding = lengths.to(self.keys[0].device, torch.long)

    def position_ids(self, s: int) -> torch.Tensor:
        """Positions of the next s tokens of each row, counted from its first real token: [b, s]."""
        slots = torch.arange(self.seq_len, self.seq_len + s, device=self.left_padding.device)
        return (slots[None, :] - self.left_padding[:, None]).clamp(min=0)

    def attention_mask(self, s: int) -> torch.Tensor:
        """[b, 1, s, seq_len + s] bool for the next s queries: True where a query may attend a key.

        Causal, and padding keys hidden; a padding query sees itself only, so that its softmax
        has something to normalise (its output is never used).
        """
        end = self.seq_len + s
        keys = torch.arange(end, device=self.left_padding.device)
        queries = torch.arange(self.seq_len, end, device=self.left_padding.device)
        causal = keys[None, :] <= queries[:, None]  # [s, end]
        real = keys[None, :] >= self.left_padding[:, None]  # [b, end]
        mask = (causal[None] & real[:, None, :]) | (keys[None, :] == queries[:, None])[None]
        return mask[:, None]

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
        if self.left_padding is not None:
            self.left_padding = self.left_padding[index]


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int, parallel: Optional[ParallelState] = None):
        super().__init__()
        parallel = parallel or ParallelState()
        self.layer_number = layer_number
        # Under tensor parallelism each rank holds whole query groups: num_query_groups / TP of them.
        tp = parallel.tensor_model_parallel_size
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.query_groups // tp
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_dropout
        self.backend = config.attention_backend
        self.use_rope = config.position_embedding_type == "rope"
        # Heads are split across tensor-parallel ranks: dropout masks must differ between them.
        self.rng_tracker = parallel.rng_tracker if tp > 1 else None
        self.recompute_core = parallel.recompute_granularity == "selective"
        qkv_size = (config.num_attention_heads + 2 * config.query_groups) * self.head_dim
        std = config.init_method_std
        fp8 = layer_recipe(config, layer_number)
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias,
            init_method=normal_init(std), parallel=parallel, fp8=fp8)
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear,
            init_method=scaled_init(std, config.num_layers), parallel=parallel, fp8=fp8)

    def forward(self, x: torch.Tensor, rotary=None, kv_cache: Optional[KVCache] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if kv_cache is not None and document_ids is not None:
            raise ValueError("attention: document_ids mask packed training sequences; decoding with a KV cache "
                             "takes none (generate one document per row)")
        qkv = self.linear_qkv(x)  # [b, s, (nq + 2 g) d / TP]: the whole sequence, also under SP
        b, s = qkv.shape[:2]
        r = self.num_heads // self.num_groups
        qkv = qkv.view(b, s, self.num_groups, r + 2, self.head_dim)
        q = qkv[:, :, :, :r].reshape(b, s, self.num_heads, self.head_dim)  # [b, s, nq, d]
        k = qkv[:, :, :, r]  # [b, s, g, d]
        v = qkv[:, :, :, r + 1]
        if self.use_rope:
            cos, sin = rotary
            q, k = apply_rotary_rows(q, k, cos, sin) if cos.dim() == 3 else apply_rotary(q, k, cos, sin)
        if kv_cache is not None:
            mask = kv_cache.attention_mask(s) if kv_cache.left_padding is not None else None
            k, v = kv_cache.update(self.layer_number, k, v)
            if mask is not None:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                    enable_gqa=self.num_heads != self.num_groups).transpose(1, 2)
                return self.linear_proj(out.reshape(b, s, self.num_heads * self.head_dim))
        dropout_p = self.dropout_p if self.training else 0.0
        if self.recompute_core and torch.is_grad_enabled():
            # Selective recompute (Korthikanti et al. 2022): keep q, k, v, recompute the core.
            out = torch.utils.checkpoint.checkpoint(
                self.core_attention, q, k, v, dropout_p, document_ids, use_reentrant=False,
                context_fn=checkpoint_context_fn(self.rng_tracker) if self.rng_tracker else noop_context_fn)
        else:
            out = self.core_attention(q, k, v, dropout_p, document_ids)
        return self.linear_proj(out.reshape(b, s, self.num_heads * self.head_dim))

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                       document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v with the causal mask (and the document mask, given document ids
        [b, s]): [b, s, nq, d] -> [b, s, nq, d]."""
        with self.rng_tracker.fork() if self.rng_tracker is not None and dropout_p > 0 else contextlib.nullcontext():
            return attention(q, k, v, causal=True, dropout_p=dropout_p, backend=self.backend,
                             document_ids=document_ids)
