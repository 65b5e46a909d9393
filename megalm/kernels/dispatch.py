"""Choosing which implementation of a fused op runs.

Every op in `megalm.kernels` has a plain-PyTorch reference and one or more fast paths (Triton,
hand-written CUDA). The choice, in order of precedence:

1. an explicit ``backend=`` argument other than ``"auto"`` (the model passes its config's
   ``attention_backend`` / ``normalization_backend`` here);
2. the environment variable ``MEGALM_KERNELS=reference|triton|cuda``, which forces a path for
   every op called with ``backend="auto"``. ``cuda`` means "the hand-written CUDA kernel where the
   op has one, Triton otherwise";
3. ``auto``: a fast path on CUDA tensors (Triton first, the CUDA extension where Triton is
   missing), the reference on CPU tensors.

A fast path that cannot take the given inputs (shape, dtype, device, missing build) never runs
and never gives a wrong answer: under ``auto`` the op falls back to the reference and warns once
with the reason; when the path was forced (argument or environment) it raises
`KernelUnsupportedError` naming the reason.

Nothing here imports Triton: `triton_importable` only looks the package up, so importing
`megalm.kernels` stays cheap and works where Triton is absent.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, Optional

import torch

ENV_VAR = "MEGALM_KERNELS"
FORCEABLE = ("reference", "triton", "cuda")


class KernelUnsupportedError(RuntimeError):
    """A forced fast path cannot run on the given inputs; the message says why."""


def env_backend() -> Optional[str]:
    """The path forced by ``MEGALM_KERNELS``, or None when unset / ``auto``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in FORCEABLE:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of auto, {', '.join(FORCEABLE)}")
    return value


# Looked up once (without importing it); a plain constant also keeps torch.compile tracing simple.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_FOUND


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The floating-point dtypes the fast paths take (an op may narrow this further).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_unsupported_device(*tensors: torch.Tensor) -> Optional[str]:
    """Why Triton cannot run on these tensors' device, or None if it can.

    Every op's Triton path asks this first, so the rules of the device (CUDA, or the CPU
    interpreter and what it cannot do) are written once here.
    """
    if not triton_importable():
        return "triton is not installed"
    device = tensors[0].device
    if any(t.device != device for t in tensors[1:]):
        return "inputs are on different devices"
    if device.type == "cuda":
        return None
    if device.type != "cpu" or not triton_interpreting():
        return (f"Triton needs CUDA tensors, got {device.type} tensors "
                f"(TRITON_INTERPRET=1 runs the kernels on CPU, slowly, for testing)")
    if any(t.dtype == torch.bfloat16 for t in tensors):
        return "the Triton interpreter has no bfloat16"
    return None


_warned: set[tuple[str, str]] = set()


def warn_once(op: str, message: str) -> None:
    """Warn about a fallback the first time it happens for this op and reason."""
    key = (op, message)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"megalm.kernels.{op}: {message}", RuntimeWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which fallbacks were already reported (tests use this)."""
    _warned.clear()


def select(op: str, backend: str, device: torch.device, fast: tuple[str, ...],
           unsupported: Callable[[str], Optional[str]]) -> str:
    """Pick the implementation of `op` to run.

    `fast` lists the op's fast paths in order of preference (e.g. ``("triton", "cuda")``);
    `unsupported(name)` returns why path `name` cannot take the current inputs, or None.
    Returns ``"reference"`` or one of `fast`.
    """
    allowed = ("auto", "reference") + fast
    if backend not in allowed:
        raise ValueError(f"{op}: backend={backend!r}; expected one of {', '.join(allowed)}")
    forced, source = backend, f"backend={backend!r}"
    if forced == "auto":
        forced, source = env_backend(), f"{ENV_VAR}={os.environ.get(ENV_VAR)}"
        if forced == "cuda" and "cuda" not in fast:
            # The environment speaks for every op; an op without a CUDA kernel uses Triton.
            forced = "triton"
    if forced == "reference":
        return "reference"
    if forced is not None:
        if forced not in fast:
            raise KernelUnsupportedError(f"{op}: {source} forces '{forced}', which {op} does not have")
        reason = unsupported(forced)
        if reason is not None:
            raise KernelUnsupportedError(f"{op}: {source} forces '{forced}', which cannot run here: {reason}")
        return forced
    if device.type != "cuda":
        return "reference"
    reasons = []
    for name in fast:
        reason = unsupported(name)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    warn_once(op, "falling back to the PyTorch reference (" + "; ".join(reasons) + ")")
    return "reference"


def is_compiling() -> bool:
    """True while torch.compile traces (one-time benchmarking must not run then)."""
    return bool(torch.compiler.is_compiling())
