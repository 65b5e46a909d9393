"""RMSNorm and LayerNorm over the last dimension: reference, Triton / CUDA paths, dispatch.

RMSNorm follows the Hugging Face Llama convention (also Megatron's when the weight is kept in the
activation dtype): statistics in fp32, the normalised value cast back to the input dtype, then
multiplied by the weight (cast to the input dtype)::

    y = (x_fp32 * rsqrt(mean(x_fp32 ** 2) + eps)).to(x.dtype) * weight.to(x.dtype)

LayerNorm follows ``torch.nn.functional.layer_norm``: everything in fp32, one cast at the end::

    y = ((x_fp32 - mean) * rsqrt(var + eps) * weight + bias).to(x.dtype)

The output always has the input's dtype; weight / bias gradients come back in their own dtype.
The fast paths run forward and backward as `megalm::norm_forward` / `megalm::norm_backward`
custom ops inside one autograd Function, so `torch.compile` keeps them in its graph.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megalm.kernels import dispatch

_MAX_TRITON_WIDTH = 65536


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def _rows(x: Tensor) -> Tensor:
    """[..., h] -> contiguous [n, h]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("megalm::norm_forward", mutates_args=())
def _norm_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool,
                  impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """x [n, h] -> (y [n, h], mean [n] fp32 (empty for RMSNorm), rstd [n] fp32)."""
    if impl == "cuda":
        from megalm.kernels import _cuda
        y, rstd = _cuda.extension().rms_norm_forward(x, weight, eps)
        return y, rstd.new_empty(0), rstd
    from megalm.kernels._triton.norm import norm_forward
    return norm_forward(x, weight, bias, eps, rms)


@_norm_forward.register_fake
def _(x, weight, bias, eps, rms, impl):
    rows = x.shape[0]
    return (torch.empty_like(x), x.new_empty(0 if rms else rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("megalm::norm_backward", mutates_args=())
def _norm_backward(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, rms: bool,
                   has_bias: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx [n, h], dweight [h] fp32, dbias [h] fp32 (empty without bias))."""
    if impl == "cuda":
        from megalm.kernels import _cuda
        dx, dw = _cuda.extension().rms_norm_backward(dy, x, weight, rstd)
        return dx, dw, dw.new_empty(0)
    from megalm.kernels._triton.norm import norm_backward
    return norm_backward(dy, x, weight, mean, rstd, rms, has_bias)


@_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, rms, has_bias, impl):
    h = x.shape[1]
    return (torch.empty_like(x), x.new_empty(h, dtype=torch.float32),
            x.new_empty(h if has_bias else 0, dtype=torch.float32))


class NormFunction(torch.autograd.Function):
    """RMSNorm / LayerNorm through a fast path; saves x and the per-row statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, impl):
        shape = x.shape
        x2 = _rows(x)
        y, mean, rstd = _norm_forward(x2, weight.contiguous(), None if bias is None else bias.contiguous(),
                                      float(eps), rms, impl)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.impl, ctx.has_bias = rms, impl, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _norm_backward(_rows(dy), x2, weight.contiguous(), mean, rstd, ctx.rms,
                                    ctx.has_bias, ctx.impl)
        db = db.to(ctx.bias_dtype) if ctx.has_bias else None
        return dx.view(dy.shape), dw.to(weight.dtype), db, None, None, None


def _unsupported(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    def check(name: str) -> Optional[str]:
        if name == "cuda":
            if op != "rms_norm":
                return "there is no CUDA LayerNorm kernel (use triton)"
            from megalm.kernels import _cuda
            if _cuda.extension() is None:
                return f"the CUDA extension is not available ({_cuda.unavailable_reason()})"
            if x.device.type != "cuda":
                return f"the CUDA kernel needs CUDA tensors, got {x.device.type}"
            if weight.dtype not in (x.dtype, torch.float32):
                return f"the CUDA kernel needs the weight in {x.dtype} or float32, got {weight.dtype}"
            if x.dim() > 0 and x.shape[-1] > _cuda.extension().rms_norm_max_cols(x):
                return f"hidden size {x.shape[-1]} > {_cuda.extension().rms_norm_max_cols(x)} for {x.dtype}"
        else:
            reason = dispatch.triton_unsupported_device(x, weight)
            if reason is not None:
                return reason
            if x.shape[-1] > _MAX_TRITON_WIDTH:
                return f"hidden size {x.shape[-1]} > {_MAX_TRITON_WIDTH} (one row per program)"
        if x.dtype not in dispatch.FLOAT_DTYPES or weight.dtype not in dispatch.FLOAT_DTYPES:
            return f"unsupported dtype {x.dtype} / weight {weight.dtype}"
        if weight.shape != (x.shape[-1],) or (bias is not None and bias.shape != weight.shape):
            return f"weight / bias shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}"
        if x.numel() == 0:
            return "empty input"
        return None
    return check


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dim of x [..., h] with weight [h]; backend auto|triton|cuda|reference."""
    impl = dispatch.select("rms_norm", backend, x.device, ("triton", "cuda"),
                           _unsupported("rms_norm", x, weight, None))
    if impl == "reference":
        return rms_norm_reference(x, weight, eps)
    return NormFunction.apply(x, weight, None, eps, True, impl)


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
               backend: str = "auto") -> Tensor:
    """LayerNorm over the last dim of x [..., h]; backend auto|triton|cuda|reference (no CUDA kernel)."""
    impl = dispatch.select("layer_norm", backend, x.device, ("triton", "cuda"),
                           _unsupported("layer_norm", x, weight, bias))
    if impl == "reference":
        return layer_norm_reference(x, weight, bias, eps)
    return NormFunction.apply(x, weight, bias, eps, False, impl)
