"""Fused ops for the GPT model, each beside its plain-PyTorch reference.

One public function per op; each takes ``backend=`` and dispatches as `megalm.kernels.dispatch`
describes (fast path on CUDA tensors, reference on CPU, ``MEGALM_KERNELS`` to force one).
Importing this package imports neither Triton nor the CUDA extension: they load on first use.
"""

import torch

from megalm.kernels import _cuda, dispatch
from megalm.kernels.attention import attention
from megalm.kernels.cross_entropy import cross_entropy, linear_cross_entropy
from megalm.kernels.dispatch import KernelUnsupportedError
from megalm.kernels.grouped_gemm import grouped_gemm
from megalm.kernels.moe_permute import expert_rows, permute, unpermute
from megalm.kernels.moe_router import topk_router
from megalm.kernels.rmsnorm import layer_norm, rms_norm
from megalm.kernels.rope import apply_rotary
from megalm.kernels.swiglu import swiglu

__all__ = ["KernelUnsupportedError", "apply_rotary", "attention", "cross_entropy", "describe", "expert_rows",
           "grouped_gemm", "layer_norm", "linear_cross_entropy", "permute", "rms_norm", "swiglu", "topk_router",
           "unpermute"]


def _path(backend: str, device: torch.device, fast: tuple[str, ...]) -> str:
    """What `dispatch.select` will pick for supported inputs on `device`, in words."""
    if backend != "auto":
        return f"{backend} (forced by config)"
    env = dispatch.env_backend()
    if env is not None:
        return f"{env if env in fast or env == 'reference' else 'triton'} (forced by {dispatch.ENV_VAR})"
    if device.type != "cuda":
        return "reference"
    if dispatch.triton_importable() and "triton" in fast:
        return "triton"
    if "cuda" in fast:
        return f"cuda (extension {_cuda.status()})"
    return "reference (triton is not installed)"


def describe(device, config=None) -> dict[str, str]:
    """Which implementation each op of a model built from `config` (a ModelConfig) takes on `device`."""
    device = torch.device(device)
    attention_backend = getattr(config, "attention_backend", "auto")
    norm_backend = getattr(config, "normalization_backend", "auto")
    fusion = getattr(config, "cross_entropy_fusion", "auto")
    if attention_backend == "auto" and dispatch.env_backend() is None:
        attn = "sdpa" if device.type != "cuda" else "auto (fastest of triton / SDPA backends, timed per shape)"
    elif attention_backend == "auto" and dispatch.env_backend() == "reference":
        attn = f"reference (forced by {dispatch.ENV_VAR})"
    elif attention_backend == "auto":
        attn = f"triton (forced by {dispatch.ENV_VAR})"
    else:
        attn = f"{attention_backend} (forced by config)"
    norm_name = "rms_norm" if getattr(config, "normalization", "RMSNorm") == "RMSNorm" else "layer_norm"
    fused = fusion == "fused" or (fusion == "auto" and device.type == "cuda")
    info = {
        "attention": attn,
        norm_name: _path(norm_backend, device, ("triton", "cuda") if norm_name == "rms_norm" else ("triton",)),
        "cross_entropy": ("fused linear_cross_entropy: " if fused else "unfused cross_entropy: ")
        + _path("auto", device, ("triton",)),
    }
    if config is None or getattr(config, "position_embedding_type", "rope") == "rope":
        info["apply_rotary"] = _path("auto", device, ("triton",))
    if config is None or getattr(config, "swiglu", True):
        info["swiglu"] = _path("auto", device, ("triton",))
    if getattr(config, "fp8_format", None):
        info["fp8_gemm"] = (f"reference (forced by {dispatch.ENV_VAR})" if dispatch.env_backend() == "reference"
                            else "scaled_mm (torch._scaled_mm)" if device.type == "cuda" else "reference")
    if getattr(config, "num_experts", None):
        info["moe_router"] = _path("auto", device, ("triton",))
        info["moe_permute"] = _path("auto", device, ("triton", "cuda"))
        info["grouped_gemm"] = _path("auto", device, ("triton",))
    return info
