"""FP8 matmul: scaling, quantization and the scaled GEMM of FP8 training.

An FP8 number has a narrow range (E4M3: +-448 with 3 mantissa bits; E5M2: +-57344 with 2), so a
tensor is multiplied by a scale before the cast that maps its largest magnitude (amax) onto the
format's largest value, and the GEMM divides the scales out again:

    scale = fp8_max / amax                   (1 for an all-zero tensor)
    q     = saturate(x * scale).to(fp8)      (values past +-fp8_max clip instead of overflowing)
    x    ~= q / scale

A scale is per tensor (`tensorwise`: one 0-dim scale) or per row along the GEMM's reduction
dimension (`rowwise`: a keepdim vector), so each output element divides by one scale of each
operand. `fp8_gemm(a, b)` computes a @ b^T in the `torch.nn.Linear` layout (a [m, k], b [n, k],
scales [m, 1] / [n, 1] or 0-dim) and returns it in a high-precision dtype.

Paths: ``scaled_mm`` (`torch._scaled_mm`: FP8 tensor cores on GPUs of compute capability 8.9 and
up; on CPU it runs too, as a slow loop) and the reference, which de-quantizes both operands to fp32
and multiplies: the products of two FP8 numbers are exact in fp32, so the reference computes what
the FP8 GEMM computes up to the order of the fp32 sums. Under ``auto`` CUDA tensors take
``scaled_mm``, CPU tensors the reference; ``MEGALM_KERNELS=reference`` forces the reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from megalm.kernels import dispatch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344


class Fp8Tensor(NamedTuple):
    """FP8 codes and the scale they were multiplied by (0-dim, or keepdim along the reduction dim)."""
    data: Tensor
    scale: Tensor

    def t(self) -> "Fp8Tensor":
        return Fp8Tensor(self.data.t(), self.scale.t())


def amax(x: Tensor, dim: Optional[int] = None) -> Tensor:
    """Largest magnitude, fp32: of the whole tensor (dim None, 0-dim) or along `dim` (keepdim)."""
    x = x.detach()
    if dim is None:
        return x.abs().amax().float()
    return x.abs().amax(dim=dim, keepdim=True).float()


def scale_from_amax(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8_max / amax, fp32; 1 where amax is 0 (nothing to scale), and finite for a tiny amax."""
    fp8_max = FP8_MAX[dtype]
    safe = amax.float().clamp(min=fp8_max / torch.finfo(torch.float32).max)
    return torch.where(amax > 0, fp8_max / safe, torch.ones_like(safe))


def quantize(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Fp8Tensor:
    """Saturating cast: x * scale clipped to +-fp8_max (NaN stays NaN), then rounded to `dtype`."""
    fp8_max = FP8_MAX[dtype]
    return Fp8Tensor((x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype), scale)


def dequantize(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.data.float() / q.scale).to(dtype)


def fp8_gemm_reference(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> Tensor:
    """a [m, k] @ b [n, k]^T -> [m, n] in out_dtype, from the exact fp32 values of the codes."""
    y = a.data.float() @ b.data.float().t()
    return (y / (a.scale * b.scale.t())).to(out_dtype)


def _fp8_gemm_scaled_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> Tensor:
    # _scaled_mm multiplies by de-quantization scales and wants a row-major, b column-major.
    rowwise = a.scale.dim() > 0
    return torch._scaled_mm(a.data.contiguous(), b.data.contiguous().t(),
                            scale_a=a.scale.reciprocal().reshape(-1, 1).contiguous() if rowwise else a.scale.reciprocal(),
                            scale_b=b.scale.reciprocal().reshape(1, -1).contiguous() if rowwise else b.scale.reciprocal(),
                            out_dtype=out_dtype)


def _unsupported(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> Optional[str]:
    """Why `torch._scaled_mm` cannot take these operands, or None (on CPU it takes them all)."""
    device = a.data.device
    if device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 tensor cores need compute capability 8.9 or newer (Ada, Hopper)"
    if any(d % 16 for d in (*a.data.shape, b.data.shape[0])):
        return f"the GEMM's sizes must be multiples of 16, got a {tuple(a.data.shape)}, b {tuple(b.data.shape)}"
    if a.data.dtype == b.data.dtype == E5M2:
        return "cuBLAS has no E5M2 x E5M2 GEMM"
    if a.scale.dim() > 0 and (E5M2 in (a.data.dtype, b.data.dtype) or out_dtype != torch.bfloat16):
        return "row-wise scales take float8_e4m3fn operands and a bfloat16 output"
    return None


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype, backend: str = "auto") -> Tensor:
    """a [m, k] @ b [n, k]^T de-quantized -> [m, n] in out_dtype.

    `backend`: auto, reference or scaled_mm (see the module docs). ``MEGALM_KERNELS=triton|cuda``
    leaves the choice to auto: the fast path of this op is neither.
    """
    if backend not in ("auto", "reference", "scaled_mm"):
        raise ValueError(f"fp8_gemm: backend={backend!r}; expected one of auto, reference, scaled_mm")
    if backend == "auto" and (dispatch.env_backend() == "reference" or a.data.device.type != "cuda"):
        backend = "reference"
    if backend != "reference":
        reason = _unsupported(a, b, out_dtype)
        if reason is not None and backend == "scaled_mm":
            raise dispatch.KernelUnsupportedError(f"fp8_gemm: backend='scaled_mm' cannot run here: {reason}")
        if reason is not None:
            dispatch.warn_once("fp8_gemm", f"falling back to the PyTorch reference ({reason})")
        backend = "reference" if reason is not None else "scaled_mm"
    if backend == "reference":
        return fp8_gemm_reference(a, b, out_dtype)
    return _fp8_gemm_scaled_mm(a, b, out_dtype)
