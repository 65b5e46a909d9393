"""The hand-written CUDA kernels (csrc/cuda) as a torch extension, when one can be had.

Order: the prebuilt extension ``megalm._cuda_kernels`` (built by setup.py where CUDA is present);
otherwise, when a GPU is visible and the sources are in the checkout, a JIT build with
`torch.utils.cpp_extension.load` on first use (a minute or two, cached by torch afterwards);
otherwise nothing, and `unavailable_reason()` says why. Nothing is built at import time.
"""

import importlib.util
from pathlib import Path
from typing import Optional

import torch

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = ("bindings.cpp", "rmsnorm_kernels.cu", "moe_bindings.cpp", "moe_permute_kernels.cu")

_state: dict = {}


def _sources_present() -> bool:
    return all((SOURCE_DIR / name).is_file() for name in SOURCES)


def extension():
    """The loaded extension module, or None (then `unavailable_reason()` explains)."""
    if "module" in _state:
        return _state["module"]
    module, reason = None, None
    try:
        import megalm._cuda_kernels as module  # noqa: F811 (prebuilt by setup.py)
    except ImportError:
        if not torch.cuda.is_available():
            reason = "no prebuilt megalm._cuda_kernels and no CUDA device to build it for"
        elif not _sources_present():
            reason = f"no prebuilt megalm._cuda_kernels and no sources under {SOURCE_DIR}"
        else:
            try:
                from torch.utils.cpp_extension import load
                module = load(name="megalm_cuda_kernels", sources=[str(SOURCE_DIR / s) for s in SOURCES],
                              extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
            except Exception as error:  # a failed build must not take the run down: report it
                reason = f"JIT build of {SOURCE_DIR} failed: {type(error).__name__}: {error}"
    _state["module"], _state["reason"] = module, reason
    return module


def unavailable_reason() -> Optional[str]:
    extension()
    return _state["reason"]


def status() -> str:
    """One phrase for the start-up log, without building anything."""
    if "module" in _state:
        return "loaded" if _state["module"] is not None else f"unavailable ({_state['reason']})"
    if importlib.util.find_spec("megalm._cuda_kernels") is not None:
        return "prebuilt"
    if torch.cuda.is_available() and _sources_present():
        return "JIT-built on first use"
    return "unavailable (no prebuilt extension" + ("" if torch.cuda.is_available() else ", no CUDA device") + ")"
