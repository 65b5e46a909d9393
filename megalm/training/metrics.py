"""Training logs: one console line per log interval, the same scalars in TensorBoard.

Throughput accounting:
    tokens/s      = global batch x seq length x iterations / elapsed seconds
    TFLOP/s/dev   = model FLOPs per token (GPTModel.flops_per_token: forward + backward matmuls)
                    x tokens/s / number of devices
    MFU           = TFLOP/s/dev / the device's peak dense bf16 (or fp32 on CPU, if known) FLOP/s
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Optional

import torch

# Dense (non-sparse) peak FLOP/s by device name fragment and compute dtype.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    for fragment, table in PEAK_FLOPS.items():
        if fragment in name and table[key]:
            return table[key]
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


class MetricsLogger:
    """Prints and records scalars; only the main rank is given a writer and prints."""

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str] = None, stream=sys.stdout):
        self.enabled = enabled
        self.stream = stream
        self.writer = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed
                raise RuntimeError("--tensorboard-dir needs the tensorboard package: "
                                   "pip install tensorboard") from e
            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Wall-clock timing of the iterations between two log lines."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self._sync()
        self.start = time.perf_counter()
        self.iterations = 0

    def elapsed(self) -> float:
        self._sync()
        return time.perf_counter() - self.start
