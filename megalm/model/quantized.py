"""Weight-only quantized storage of a linear layer's weight: the grids, int4 packing, round to
nearest and `QuantizedLinear`, which de-quantizes its weight in the forward pass.

Inference quantizes a finished model with them (`megalm.inference.quantize`, which documents the
formats); QLoRA holds the frozen base weights of its adapted layers this way
(`megalm.posttrain.lora`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---- grids, packing ---------------------------------------------------------------------------

def _grid(w: Tensor, bits: int, symmetric: bool):
    """Scale and integer zero point per row of w [out, k] -> ([out] fp32 scale, [out] fp32 zero).
    The scale is rounded to fp16 first, so that the codes are chosen for the scale that is stored."""
    maxq = 2 ** bits - 1
    if symmetric:
        scale = w.abs().amax(dim=1) / (maxq // 2)
        zero = torch.full_like(scale, (maxq + 1) // 2) if bits < 8 else torch.zeros_like(scale)
    else:
        low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = (high - low) / maxq
        zero = torch.round(-low / scale.clamp(min=torch.finfo(torch.float16).tiny))
    scale = scale.clamp(min=torch.finfo(torch.float16).tiny).half().float()
    return scale, zero


def _codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w [out, k] with per-row scale / zero [out] (or broadcastable) -> integer codes (fp32)."""
    if bits == 8:
        return torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)


def pack_int4(codes: Tensor) -> Tensor:
    """[out, in] codes 0..15 -> [out, in / 2] uint8 (even feature in the low nibble)."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """[out, in / 2] uint8 -> [out, in] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ---- the module -------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """y = x W^T + b with W kept as int8 (per channel) or packed int4 (per group) codes.

    `persistent=False` leaves the codes out of the state dict (QLoRA writes the de-quantized weight
    in their place)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device=None, persistent: bool = True):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == 8 else min(group_size, in_features)
        if in_features % self.group_size or (bits == 4 and in_features % 2):
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {self.group_size}")
        groups = in_features // self.group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                 persistent=persistent)
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device), persistent=persistent)
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device),
                                 persistent=persistent)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device),
                             persistent=persistent)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def set_codes(self, codes: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> None:
        """codes [out, in] integers; scales / zeros [out, groups]."""
        if self.bits == 8:
            self.qweight.copy_(codes.to(torch.int8))
        else:
            self.qweight.copy_(pack_int4(codes))
            self.zeros.copy_(zeros.to(torch.uint8))
        self.scales.copy_(scales.half())

    def dequantize(self) -> Tensor:
        """The weight [out, in], fp32."""
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
        if self.bits == 8:
            return self.qweight.float() * scales
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return (unpack_int4(self.qweight).float() - zeros) * scales

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def quantize_rtn(w: Tensor, bits: int, group_size: int, symmetric: bool):
    """Round to nearest -> (codes [out, in], scales [out, groups], zeros [out, groups])."""
    out, n = w.shape
    g = n if bits == 8 else min(group_size, n)
    groups = w.float().reshape(out * n // g, g)
    scale, zero = _grid(groups, bits, symmetric or bits == 8)
    codes = _codes(groups, scale, zero, bits).reshape(out, n)
    return codes, scale.reshape(out, n // g), zero.reshape(out, n // g)
