"""Training logs: one console line per log interval, the same scalars in TensorBoard.

Throughput accounting:
    tokens/s      = global batch x seq length x iterations / elapsed seconds
    TFLOP/s/dev   = model FLOPs per token (GPTModel.flops_per_token: forward + backward matmuls)
                    x tokens/s / number of devices
    MFU           = TFLOP/s/dev / the device's peak dense bf16 (or fp32 on CPU, if known) FLOP/s

Mixture-of-experts runs add the expert load and router losses of every MoE layer (`moe_statistics`,
read from the statistics each `megalm.model.moe.MoELayer` keeps, summed over ranks).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Optional

import torch

from megalm.model.moe import moe_layers

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


def duration(seconds: float) -> str:
    """A compact duration for log lines: 45s, 3m05s, 2h07m, 3d04h."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


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


# ---------------------------------------------------------------------------------------- MoE

def _add_layer(per_layer: dict, number: int, entry: tuple) -> None:
    """Sum `entry` (counts, aux, z, dropped, calls, capped) into layer `number`'s."""
    if number in per_layer:
        counts, *scalars, capped = per_layer[number]
        entry = ([a + b for a, b in zip(counts, entry[0])], *(a + b for a, b in zip(scalars, entry[1:5])),
                 capped or entry[5])
    per_layer[number] = entry


def moe_statistics(models, group=None, pipeline_group=None) -> Optional[dict]:
    """Per-layer expert load and losses since the last call (then reset), summed over `group` (the
    data-parallel ranks) and collected from every stage of `pipeline_group` (collective on both:
    every rank calls it, with or without MoE layers of its own).

    Returns None without MoE layers anywhere, else {"aux_loss", "z_loss" (means over layers and
    forward passes), "dropped" (assignments dropped; None when dropless), "load_cv" {layer:
    coefficient of variation of the tokens per expert}, "tokens_per_expert" {layer: list}}.
    """
    layers = [m for model in models for m in moe_layers(model)]
    per_layer = {}
    if layers:
        packed = torch.cat([torch.cat([m.stats["tokens_per_expert"],
                                       torch.stack([m.stats["aux_loss"], m.stats["z_loss"], m.stats["dropped"],
                                                    torch.tensor(float(m.stats["calls"]), dtype=torch.float64,
                                                                 device=m.stats["aux_loss"].device)])])
                            for m in layers])
        if group is not None:
            torch.distributed.all_reduce(packed, group=group)
        packed = packed.cpu()
        offset = 0
        for m in layers:
            counts = packed[offset: offset + m.num_experts]
            a, zz, d, c = packed[offset + m.num_experts: offset + m.num_experts + 4].tolist()
            offset += m.num_experts + 4
            _add_layer(per_layer, m.layer_number, (counts.tolist(), a, zz, d, c, m.capacity_factor is not None))
            m.reset_statistics()
    if pipeline_group is not None:  # the other stages' layers
        gathered = [None] * torch.distributed.get_world_size(pipeline_group)
        torch.distributed.all_gather_object(gathered, per_layer, group=pipeline_group)
        per_layer = {}
        for stage in gathered:
            for number, entry in stage.items():
                _add_layer(per_layer, number, entry)
    if not per_layer or not any(c for *_, c, _ in per_layer.values()):
        return None
    out = {"load_cv": {}, "tokens_per_expert": {}}
    aux = z = dropped = calls = 0.0
    for number in sorted(per_layer):
        counts, a, zz, d, c, _ = per_layer[number]
        aux, z, dropped, calls = aux + a, z + zz, dropped + d, calls + c
        counts_t = torch.tensor(counts, dtype=torch.float64)
        mean = counts_t.mean()
        out["load_cv"][number] = float(counts_t.std(unbiased=False) / mean) if mean > 0 else 0.0
        out["tokens_per_expert"][number] = counts
    out["aux_loss"], out["z_loss"] = aux / max(calls, 1), z / max(calls, 1)
    out["dropped"] = dropped if any(capped for *_, capped in per_layer.values()) else None
    return out


def moe_log(stats: dict) -> tuple:
    """(a compact part for the console line, TensorBoard scalars) from `moe_statistics`."""
    cvs = stats["load_cv"]
    mean_cv = sum(cvs.values()) / len(cvs)
    line = f"moe aux {stats['aux_loss']:.4f} z {stats['z_loss']:.3f} load cv {mean_cv:.3f}"
    scalars = {"moe/aux_loss": stats["aux_loss"], "moe/z_loss": stats["z_loss"]}
    scalars.update({f"moe/load_cv_layer{i}": cv for i, cv in cvs.items()})
    if stats["dropped"] is not None:  # capacity on
        line += f" dropped {int(stats['dropped'])}"
        scalars["moe/dropped_tokens"] = stats["dropped"]
    return line, scalars
