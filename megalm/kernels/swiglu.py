"""SwiGLU activation on the fused gate/up projection output.

x is [..., 2f] with the gate half first (Megatron's fused ``linear_fc1`` and the Hugging Face
``gate_up_proj`` order): ``y = silu(x[..., :f]) * x[..., f:]`` of shape [..., f], computed in fp32
and returned in x's dtype. The Triton path reads x once and writes y once, and its backward
recomputes silu instead of saving it.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megalm.kernels import dispatch


def swiglu_reference(x: Tensor) -> Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@torch.library.custom_op("megalm::swiglu_forward", mutates_args=())
def _swiglu_forward(x: Tensor) -> Tensor:
    """x [n, 2f] contiguous -> y [n, f]."""
    from megalm.kernels._triton.swiglu import swiglu_forward
    return swiglu_forward(x)


@_swiglu_forward.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


@torch.library.custom_op("megalm::swiglu_backward", mutates_args=())
def _swiglu_backward(dy: Tensor, x: Tensor) -> Tensor:
    """dy [n, f], x [n, 2f] -> dx [n, 2f]."""
    from megalm.kernels._triton.swiglu import swiglu_backward
    return swiglu_backward(dy, x)


@_swiglu_backward.register_fake
def _(dy, x):
    return torch.empty_like(x)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return _swiglu_forward(x2).view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dx = _swiglu_backward(dy.reshape(-1, dy.shape[-1]).contiguous(), x2)
        return dx.view(ctx.shape)


def _unsupported(x: Tensor):
    def check(name: str) -> Optional[str]:
        reason = dispatch.triton_unsupported_device(x)
        if reason is not None:
            return reason
        if x.dim() == 0 or x.shape[-1] % 2:
            return f"last dim must be even (gate and up halves), got shape {tuple(x.shape)}"
        if x.dtype not in dispatch.FLOAT_DTYPES:
            return f"unsupported dtype {x.dtype}"
        if x.numel() == 0:
            return "empty input"
        return None
    return check


def swiglu(x: Tensor, backend: str = "auto") -> Tensor:
    """silu(gate) * up for x [..., 2f] = [gate | up] -> [..., f]; backend auto|triton|reference."""
    impl = dispatch.select("swiglu", backend, x.device, ("triton",), _unsupported(x))
    if impl == "reference":
        return swiglu_reference(x)
    return SwiGLUFunction.apply(x)
