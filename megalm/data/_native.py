"""Load the C++ helpers in `csrc/`: prebuilt, compiled on first use, or not at all.

`load("bpe")` returns the module `megalm._bpe_cpp` built from `csrc/bpe.cpp` (`"dataset"` gives
`megalm._dataset_cpp` from `csrc/dataset_helpers.cpp`). The order of attempts:

1. the module installed by `setup.py` (``pip install -e .``);
2. a copy compiled just in time with the system ``g++`` and pybind11's headers into
   ``$MEGALM_CACHE_DIR`` (default ``~/.cache/megalm``), keyed by a hash of the source and the
   interpreter, so an edited source or another Python gets its own build; a file lock keeps
   concurrent processes from compiling the same thing twice;
3. ``None``: the caller uses its pure Python / numpy fallback, which gives identical results.

``MEGALM_NO_JIT=1`` skips step 2 (tests use it to exercise the fallbacks).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

SOURCES = {"bpe": "bpe.cpp", "dataset": "dataset_helpers.cpp"}
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_loaded: dict[str, Optional[ModuleType]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("MEGALM_CACHE_DIR", Path.home() / ".cache" / "megalm"))


def jit_enabled() -> bool:
    return os.environ.get("MEGALM_NO_JIT", "0") in ("", "0")


def load(name: str) -> Optional[ModuleType]:
    """The native module for `name` ("bpe" or "dataset"), or None when none can be had."""
    if name not in _loaded:
        _loaded[name] = _import_prebuilt(name) or (_build(name) if jit_enabled() else None)
    return _loaded[name]


def _module_name(name: str) -> str:
    return f"megalm._{name}_cpp"


def _import_prebuilt(name: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(_module_name(name))
    except ImportError:
        return None


def _build(name: str) -> Optional[ModuleType]:
    source = _CSRC / SOURCES[name]
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if not source.exists() or compiler is None:
        logger.info("no %s or no C++ compiler: using the Python fallback for %s", source, name)
        return None
    try:
        import pybind11
    except ImportError:
        logger.info("pybind11 is not installed: using the Python fallback for %s", name)
        return None
    key = hashlib.sha256(source.read_bytes() + sys.version.encode() + pybind11.__version__.encode())
    module = _module_name(name).rsplit(".", 1)[1]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}" / f"{module}{suffix}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _compile(compiler, source, target, pybind11.get_include())
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("compiling %s failed, using the Python fallback:\n%s", source, detail[-2000:])
        return None
    spec = importlib.util.spec_from_file_location(_module_name(name), target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(compiler: str, source: Path, target: Path, pybind11_include: str) -> None:
    logger.info("compiling %s (once; cached in %s)", source.name, target.parent)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    cmd = [compiler, "-O3", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden",
           f"-I{pybind11_include}", f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(tmp)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, target)
