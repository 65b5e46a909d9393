"""Triton rotary embedding: one program per token rotates all of its q heads and k heads.

q / k may be strided views (a slice of a fused qkv output); the outputs are contiguous. cos / sin
for the token are loaded once and shared by every head. ``inverse`` rotates by -theta, which is
the backward pass (the rotation matrix is orthogonal).
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2


@triton.jit
def _rotate_heads(X, OUT, cos, sin, heads, half, stride_h, offs_d,
                  BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < half)
    src = X + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = OUT + offs_h[:, None] * (2 * half) + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, QO, KO, Cos, Sin, seq_len, n_q, n_kv, half,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   INVERSE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    offs_d = tl.arange(0, BLOCK_D)
    cos = tl.load(Cos + s * half + offs_d, mask=offs_d < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + s * half + offs_d, mask=offs_d < half, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    _rotate_heads(Q + b * stride_qb + s * stride_qs, QO + token * n_q * 2 * half, cos, sin, n_q, half,
                  stride_qh, offs_d, BLOCK_HQ)
    _rotate_heads(K + b * stride_kb + s * stride_ks, KO + token * n_kv * 2 * half, cos, sin, n_kv, half,
                  stride_kh, offs_d, BLOCK_HK)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool):
    b, s, n_q, d = q.shape
    n_kv = k.shape[2]
    q_out = torch.empty((b, s, n_q, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, s, n_kv, d), dtype=k.dtype, device=k.device)
    block_d = next_power_of_2(d // 2)
    block_hq, block_hk = next_power_of_2(n_q), next_power_of_2(n_kv)
    warps = 8 if block_hq * block_d >= 4096 else 4
    _rotary_kernel[(b * s,)](
        q, k, q_out, k_out, cos, sin, s, n_q, n_kv, d // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        INVERSE=inverse, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=warps)
    return q_out, k_out
