"""Triton implementations of the fused ops. Imported lazily by the op modules one level up, so that
`import megalm.kernels` neither needs nor loads Triton. Shared launch helpers live here."""

import functools

import torch
import triton

from megalm.kernels.dispatch import triton_interpreting


def row_num_warps(block: int) -> int:
    """Warps for a program that owns one row of `block` elements: enough threads to keep the
    per-thread register footprint small without starving the SM of programs."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """A grid size for persistent kernels that loop over rows (one wave of programs)."""
    if device.type != "cuda":
        return max(1, min(rows, 4))
    return max(1, min(rows, _sm_count(device.index if device.index is not None else torch.cuda.current_device())
                      * per_sm))


next_power_of_2 = triton.next_power_of_2
__all__ = ["next_power_of_2", "program_count", "row_num_warps", "triton_interpreting"]
