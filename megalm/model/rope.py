"""Rotary position embedding (Su et al., 2021), rotate-half convention as in Megatron and HF.

Frequencies theta_i = base^(-2i/d) for i < d/2; position p rotates the pair (x_i, x_{i+d/2}) by
p * theta_i. The cos/sin tables are [positions, d/2] fp32, computed in fp32 exactly as Hugging Face
computes them (so converted checkpoints give the same logits), and rebuilt on demand when a longer
sequence arrives; `megalm.kernels.apply_rotary` applies them to q and k.

Llama 3 scaling (`--rope-scaling-factor`) stretches the long wavelengths for long contexts: with
L the original context, wavelengths above L / low_freq_factor have their frequency divided by the
factor, those below L / high_freq_factor are kept, and the ones in between are interpolated
linearly in L / wavelength. It changes `inv_freq` once, as Hugging Face's "llama3" rope type does.

Batches whose rows sit at different positions (left-padded generation) take per-row tables from
`RotaryEmbedding.at(position_ids)` and are rotated by `apply_rotary_rows`.
"""

import math
from typing import Optional

import torch
from torch import nn


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                           high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama 3.1's frequency scaling, with the same fp32 operations as Hugging Face's."""
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rotary_rows(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [b, s, n_q, d] and k [b, s, n_kv, d] by per-row tables cos / sin [b, s, d/2] (fp32);
    the same arithmetic as the reference `megalm.kernels.apply_rotary`."""
    def rotate(x):
        half = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return rotate(q), rotate(k)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, max_positions: int = 2048,
                 scaling_factor: Optional[float] = None, low_freq_factor: float = 1.0,
                 high_freq_factor: float = 4.0, original_max_position: int = 8192):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling_factor is not None:
            inv_freq = llama3_scaled_inv_freq(inv_freq, scaling_factor, low_freq_factor,
                                              high_freq_factor, original_max_position)
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

    def at(self, position_ids: torch.Tensor):
        """cos, sin for per-row positions [b, s] -> each [b, s, d/2] fp32."""
        end = int(position_ids.max()) + 1
        if end > self.cos_cached.shape[0]:
            self._build(max(end, 2 * self.cos_cached.shape[0]))
        return self.cos_cached[position_ids], self.sin_cached[position_ids]
