"""Rotary position embedding (Su et al., 2021), rotate-half convention as in Megatron and HF.

Frequencies theta_i = base^(-2i/d) for i < d/2; position p rotates the pair (x_i, x_{i+d/2}) by
p * theta_i. The cos/sin tables are [positions, d/2] fp32, computed in fp32 exactly as Hugging Face
computes them (so converted checkpoints give the same logits), and rebuilt on demand when a longer
sequence arrives; `megalm.kernels.apply_rotary` applies them to q and k.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, max_positions: int = 2048):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d/2]
        self._build(max_positions)

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(positions, self.inv_freq)  # [length, d/2]
        self.register_buffer("cos_cached", freqs.cos(), persistent=False)
        self.register_buffer("sin_cached", freqs.sin(), persistent=False)

    def forward(self, seq_len: int, offset: int = 0):
        """cos, sin for positions [offset, offset + seq_len), each [seq_len, d/2] fp32."""
        end = offset + seq_len
        if end > self.cos_cached.shape[0]:
            self._build(max(end, 2 * self.cos_cached.shape[0]))
        return self.cos_cached[offset:end], self.sin_cached[offset:end]
