"""Process groups, carried in one small object instead of module-level globals.

`initialize()` reads the launcher's environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), creates the default process group and returns a `ParallelState`.
Every process is a data-parallel rank; model-parallel dimensions keep their slots here (sizes 1).
A single process without a launcher needs no process group at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    data_parallel_group: Optional[dist.ProcessGroup] = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def is_main(self) -> bool:
        """The rank that prints logs, writes TensorBoard and saves replicated state."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_max(self, value: float) -> float:
        """The maximum of a scalar over all ranks (identity in a single process)."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but no CUDA device is visible; "
                               "use --device cpu or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(device: str = "auto", backend: str = "auto", timeout_minutes: int = 10) -> ParallelState:
    """Set up the device and, under a launcher, the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size == 1:
        return ParallelState(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError("--distributed-backend nccl needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        kwargs = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return ParallelState(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                         backend=backend, data_parallel_group=dist.group.WORLD)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
