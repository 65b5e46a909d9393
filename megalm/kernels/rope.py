"""Rotary position embedding (rotate-half convention) applied to q and k together.

Megatron and Hugging Face rotate the two halves of each head (no interleaving)::

    x1, x2 = x[..., :d/2], x[..., d/2:]
    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)

computed in fp32 and returned in the input dtype. q is [b, s, n_q, d] and k is [b, s, n_kv, d]; both
may be strided views of a fused qkv projection (only the last dim must be contiguous). cos / sin are
[s, d/2] (fp32), already sliced by the caller for a position offset. The backward pass is the
inverse rotation (sin -> -sin). The Triton path rotates q and k in one launch.
"""

from typing import Optional

import torch
from torch import Tensor

from megalm.kernels import dispatch


def _rotate_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    cos = cos.float()[None, :, None, :]  # [1, s, 1, d/2]
    sin = sin.float()[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


@torch.library.custom_op("megalm::rotary", mutates_args=())
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """Rotate q [b, s, n_q, d] and k [b, s, n_kv, d] -> new contiguous tensors of the same shapes."""
    from megalm.kernels._triton.rope import rotary
    return rotary(q, k, cos, sin, inverse)


@_rotary.register_fake
def _(q, k, cos, sin, inverse):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotary(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk))
        dq, dk = _rotary(dq, dk, cos, sin, True)
        return dq, dk, None, None


def _unsupported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    def check(name: str) -> Optional[str]:
        reason = dispatch.triton_unsupported_device(q, k, cos, sin)
        if reason is not None:
            return reason
        if q.dim() != 4 or k.dim() != 4:
            return f"expected q, k of rank 4 [b, s, n, d], got {tuple(q.shape)} and {tuple(k.shape)}"
        b, s, _, d = q.shape
        if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
            return f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, sequence or head dim"
        if d % 2 or d > 1024:
            return f"head dim {d} must be even and at most 1024"
        if cos.shape != (s, d // 2) or sin.shape != (s, d // 2):
            return f"cos / sin must be [s, d/2] = [{s}, {d // 2}], got {tuple(cos.shape)}"
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return "the last dim of q and k must be contiguous"
        if q.dtype != k.dtype or q.dtype not in dispatch.FLOAT_DTYPES:
            return f"unsupported dtypes q {q.dtype} / k {k.dtype}"
        if q.numel() == 0 or k.numel() == 0:
            return "empty input"
        return None
    return check


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rotate q [b, s, n_q, d] and k [b, s, n_kv, d] by cos / sin [s, d/2]; backend auto|triton|reference."""
    impl = dispatch.select("apply_rotary", backend, q.device, ("triton",), _unsupported(q, k, cos, sin))
    if impl == "reference":
        return apply_rotary_reference(q, k, cos, sin)
    return RotaryFunction.apply(q, k, cos, sin)
