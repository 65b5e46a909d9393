"""Launch configurations that fit the GPU they run on: shared memory per architecture, and an early
prune for Triton autotuners that drops the configs that cannot fit before any of them is compiled.

A kernel whose inner loop feeds `tl.dot` is software-pipelined by Triton: `num_stages` copies of the
tiles it streams through the loop sit in shared memory at once, beside the tiles it keeps for the
whole program. A config past the block's shared-memory limit compiles (slowly, for nothing) and is
then refused at launch; pruning it first saves the compile and says why.

The architecture is read from Triton's active driver, so the same prune serves a real GPU and the
compile-only driver of `megalm.kernels._triton.compile_check`, which compiles for sm_80 / sm_90 on a
machine without one.
"""

import logging
from typing import Callable, Iterable

import triton

logger = logging.getLogger("megalm.kernels")

# Shared memory one block may use (the opt-in maximum, what Triton checks a kernel against), by
# compute capability: sm_80 has 164 KB per SM of which 163 KB per block, sm_90 228 KB of which 227 KB.
SHARED_MEMORY_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                       100: 227 * 1024, 120: 99 * 1024}


def target_arch() -> int:
    """Compute capability (80, 90, ...) of the device Triton compiles for now."""
    return int(triton.runtime.driver.active.get_current_target().arch)


def shared_memory_limit(arch: int) -> int:
    """Bytes of shared memory one block may use on `arch` (the nearest known lower one otherwise)."""
    known = [a for a in SHARED_MEMORY_BYTES if a <= arch]
    return SHARED_MEMORY_BYTES[max(known)] if known else min(SHARED_MEMORY_BYTES.values())


def pipelined_bytes(streamed: Iterable[tuple[int, int]], resident: Iterable[tuple[int, int]], num_stages: int,
                    element_size: int) -> int:
    """Shared memory of a pipelined `tl.dot` loop: `num_stages` copies of each streamed [rows, cols]
    tile plus one of each tile held for the whole program (an estimate; Triton's layout may add a
    little, never much, on top)."""
    tile = lambda shape: shape[0] * shape[1] * element_size  # noqa: E731
    return num_stages * sum(map(tile, streamed)) + sum(map(tile, resident))


# estimate(config kwargs, num_stages, named args of the launch, constexpr kwargs) -> bytes
Estimate = Callable[[dict, int, dict, dict], int]


def tile_estimate(streamed: Iterable[tuple[str, str]], resident: Iterable[tuple[str, str]], tensor: str) -> Estimate:
    """An `Estimate` from tile shapes named by their block sizes, e.g. ``("BLOCK_N", "BLOCK_D")``: each
    name is looked up in the config, then in the launch's constexprs; elements are `tensor`'s size."""
    streamed, resident = list(streamed), list(resident)

    def estimate(config, num_stages, args, constexprs):
        size = lambda name: config[name] if name in config else constexprs[name]  # noqa: E731
        shape = lambda tiles: [(size(rows), size(cols)) for rows, cols in tiles]  # noqa: E731
        return pipelined_bytes(shape(streamed), shape(resident), num_stages, args[tensor].element_size())
    return estimate


def shared_memory_prune(kernel: str, estimate: Estimate):
    """An ``early_config_prune`` for ``triton.autotune(prune_configs_by=...)``: keeps the configs whose
    estimated shared memory fits the target architecture and logs each one it drops, with the reason.
    When none fits it keeps the smallest, so that the launch fails with Triton's own message."""
    def prune(configs, named_args, **kwargs):
        arch = target_arch()
        limit = shared_memory_limit(arch)
        needs = [estimate(config.kwargs, config.num_stages, named_args, kwargs) for config in configs]
        kept = [config for config, need in zip(configs, needs) if need <= limit]
        for config, need in zip(configs, needs):
            if need > limit:
                reason = f"needs ~{need // 1024} KB of shared memory, sm_{arch} allows {limit // 1024} KB per block"
                logger.debug("%s: config %s pruned: %s", kernel, config, reason,
                             extra={"pruned": (kernel, str(config), reason)})
        return kept or [configs[needs.index(min(needs))]]
    return prune
