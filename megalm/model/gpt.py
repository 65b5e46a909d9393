"""The GPT decoder: embedding -> transformer layers -> final norm -> output layer (and loss).

Pre-norm residual blocks as in GPT-2 / Llama / Megatron:

    x = x + dropout(attention(norm(x)))
    x = x + dropout(mlp(norm(x)))

Activations are batch-first, [b, s, h]. With labels the forward returns the mean cross-entropy over
the tokens whose label is not `ignore_index`; the output layer and the loss can be fused so that
the [tokens x vocab] logits never exist (`--cross-entropy-fusion`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.kernels import cross_entropy, linear_cross_entropy
from megalm.model.attention import KVCache, SelfAttention
from megalm.model.init import normal_init
from megalm.model.mlp import MLP
from megalm.model.norm import build_norm
from megalm.model.rope import RotaryEmbedding
from megalm.parallel.tensor import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_logits

IGNORE_INDEX = -100


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attention = SelfAttention(config, layer_number)
        self.pre_mlp_layernorm = build_norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x: torch.Tensor, rotary=None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        h = self.self_attention(self.input_layernorm(x), rotary, kv_cache)
        x = x + F.dropout(h, self.hidden_dropout, self.training)
        h = self.mlp(self.pre_mlp_layernorm(x))
        return x + F.dropout(h, self.hidden_dropout, self.training)


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.padded_vocab_size <= 0:
            raise ValueError("ModelConfig.padded_vocab_size must be set (see megalm.config.pad_vocab_size)")
        self.config = config
        std = config.init_method_std
        self.embedding = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size, normal_init(std))
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
            normal_init(std)(self.position_embeddings.weight)
            self.rotary = None
        else:
            self.position_embeddings = None
            self.rotary = RotaryEmbedding(config.head_dim, config.rotary_base, config.max_positions)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = build_norm(config)
        if config.untie_embeddings_and_output_weights:
            self.output_layer = ColumnParallelLinear(config.hidden_size, config.padded_vocab_size,
                                                     bias=False, init_method=normal_init(std))
        else:
            self.output_layer = None

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def hidden_states(self, tokens: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """[b, s] token ids -> [b, s, h] final-normed hidden states."""
        b, s = tokens.shape
        offset = kv_cache.seq_len if kv_cache is not None else 0
        if offset + s > self.config.max_positions and self.position_embeddings is not None:
            raise ValueError(f"sequence of {offset + s} tokens is longer than the model's "
                             f"{self.config.max_positions} learned positions")
        x = self.embedding(tokens)
        rotary = None
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(offset, offset + s, device=tokens.device))
        else:
            rotary = self.rotary(s, offset)
        x = F.dropout(x, self.config.hidden_dropout, self.training)
        for layer in self.layers:
            x = layer(x, rotary, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(s)
        return self.final_layernorm(x)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """Without labels: logits [b, s, V]. With labels [b, s]: the mean loss over the tokens whose
        label is not -100."""
        h = self.hidden_states(tokens, kv_cache)
        if labels is None:
            return vocab_parallel_logits(h, self.output_weight)
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        if self._fuse_cross_entropy(h):
            return linear_cross_entropy(h, self.output_weight, labels, ignore_index=IGNORE_INDEX)
        logits = vocab_parallel_logits(h, self.output_weight)
        return cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    def _fuse_cross_entropy(self, h: torch.Tensor) -> bool:
        mode = self.config.cross_entropy_fusion
        return mode == "fused" or (mode == "auto" and h.is_cuda)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embedding.weight.numel()
            if self.position_embeddings is not None:
                n -= self.position_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_length: Optional[int] = None) -> float:
        """Training FLOPs (forward + backward = 3 x forward) per token, matmuls only.

        Per layer, forward: 2 h (q + 2 kv) d for the qkv projection, 2 nq d h for the output
        projection, 2 s nq d each for Q K^T and A V (the full s x s, as Megatron-LM and nanoGPT
        count it, so the MFU figures are comparable), and 2 h f (x3 with SwiGLU, x2 with GELU) for
        the MLP; plus 2 h V for the output layer.
        """
        c = self.config
        s = seq_length or c.seq_length
        d, nq, g, h = c.head_dim, c.num_attention_heads, c.query_groups, c.hidden_size
        per_layer = (2 * h * (nq + 2 * g) * d + 2 * nq * d * h + 4 * s * nq * d
                     + 2 * h * c.ffn_size * (3 if c.swiglu else 2))
        return 3.0 * (c.num_layers * per_layer + 2 * h * c.padded_vocab_size)
