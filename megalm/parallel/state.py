"""Process groups, carried in one small object instead of module-level globals.

`initialize()` reads the launcher's environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), creates the default process group and, from the tensor- and
pipeline-parallel sizes, the groups of every parallel dimension. It returns a `ParallelState`: this
process's place in the run (its rank in each dimension, the groups, and the run-wide settings the
layers need). A single process without a launcher needs no process group at all.

Rank order is Megatron-LM's: tensor-parallel ranks are adjacent, then data-parallel, then pipeline,

    global rank = tp_rank + TP x (dp_rank + DP x pp_rank)

so that the chattiest group (tensor parallel, several all-reduces per layer) sits on one node, and
pipeline stages, which only exchange activations point to point, span nodes. With TP=2, PP=2, DP=2
on 8 ranks: tensor groups [0,1] [2,3] [4,5] [6,7]; data groups [0,2] [1,3] [4,6] [5,7]; pipeline
groups [0,4] [1,5] [2,6] [3,7]. Expert-parallel groups are carved out of the data-parallel groups,
at a fixed tensor and pipeline rank (`megalm.parallel.expert`); context parallelism keeps its slot
here (size 1).
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from megalm.config import Config, ConfigError, ParallelConfig
from megalm.parallel.random import RNGTracker


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # Groups; None in a single process (and for the tensor / pipeline group of size 1).
    data_parallel_group: Optional[dist.ProcessGroup] = None
    tensor_model_parallel_group: Optional[dist.ProcessGroup] = None
    pipeline_model_parallel_group: Optional[dist.ProcessGroup] = None
    model_parallel_group: Optional[dist.ProcessGroup] = None  # tensor x pipeline: one model replica
    embedding_group: Optional[dist.ProcessGroup] = None  # first + last stage (tied embeddings)
    context_parallel_group: Optional[dist.ProcessGroup] = None
    expert_model_parallel_group: Optional[dist.ProcessGroup] = None
    expert_data_parallel_group: Optional[dist.ProcessGroup] = None  # same experts (megalm.parallel.expert)
    model_and_expert_parallel_group: Optional[dist.ProcessGroup] = None  # tensor x pipeline x expert
    pipeline_ranks: List[int] = field(default_factory=lambda: [0])  # global ranks of my pipeline
    # Run-wide settings the layers read.
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    rng_tracker: RNGTracker = field(default_factory=RNGTracker)

    # -- ranks

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def tensor_model_parallel_rank(self) -> int:
        return self.rank % self.tensor_model_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return (self.rank // self.tensor_model_parallel_size) % self.data_parallel_size

    @property
    def expert_model_parallel_rank(self) -> int:
        """Expert-parallel groups are blocks of consecutive data-parallel ranks (megalm.parallel.expert)."""
        return self.data_parallel_rank % self.expert_model_parallel_size

    @property
    def pipeline_model_parallel_rank(self) -> int:
        return self.rank // (self.tensor_model_parallel_size * self.data_parallel_size)

    @property
    def is_pipeline_first_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == 0

    @property
    def is_pipeline_last_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == self.pipeline_model_parallel_size - 1

    @property
    def next_pipeline_rank(self) -> int:
        """Global rank of the next stage (the first stage follows the last: virtual stages loop)."""
        return self.pipeline_ranks[(self.pipeline_model_parallel_rank + 1) % self.pipeline_model_parallel_size]

    @property
    def prev_pipeline_rank(self) -> int:
        return self.pipeline_ranks[(self.pipeline_model_parallel_rank - 1) % self.pipeline_model_parallel_size]

    @property
    def last_stage_rank(self) -> int:
        return self.pipeline_ranks[-1]

    @property
    def is_main(self) -> bool:
        """The rank that prints logs, writes TensorBoard and saves replicated state."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def model_parallel(self) -> bool:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size > 1

    # -- model layout

    def stage_layers(self, num_layers: int, virtual_stage: int = 0) -> range:
        """Global indices of the layers held by model chunk `virtual_stage` of this pipeline rank.

        Layers are cut into PP x VP equal pieces; virtual stage v of pipeline rank p holds piece
        v x PP + p (Megatron's interleaving), so a micro-batch visits every rank VP times.
        """
        pieces = self.pipeline_model_parallel_size * self.virtual_pipeline_model_parallel_size
        per = num_layers // pieces
        start = (virtual_stage * self.pipeline_model_parallel_size + self.pipeline_model_parallel_rank) * per
        return range(start, start + per)

    def is_first_chunk(self, virtual_stage: int) -> bool:
        """Does this chunk hold the embedding (the first virtual stage of the whole model)?"""
        return self.is_pipeline_first_stage and virtual_stage == 0

    def is_last_chunk(self, virtual_stage: int) -> bool:
        """Does this chunk hold the final norm and output layer?"""
        return self.is_pipeline_last_stage and virtual_stage == self.virtual_pipeline_model_parallel_size - 1

    def layout(self) -> dict:
        """The parallel layout, as recorded in checkpoint metadata."""
        return {"tensor_model_parallel_size": self.tensor_model_parallel_size,
                "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
                "virtual_pipeline_model_parallel_size": self.virtual_pipeline_model_parallel_size,
                "expert_model_parallel_size": self.expert_model_parallel_size,
                "data_parallel_size": self.data_parallel_size,
                "world_size": self.world_size}

    @classmethod
    def for_layout(cls, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   virtual_pipeline_model_parallel_size: int = 1, tensor_model_parallel_rank: int = 0,
                   pipeline_model_parallel_rank: int = 0) -> "ParallelState":
        """A state without process groups, describing one model-parallel rank of a layout: enough
        to build that rank's model shard (for resharding checkpoints), not to run it."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        return cls(rank=tensor_model_parallel_rank + tp * pipeline_model_parallel_rank, world_size=tp * pp,
                   tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
                   pipeline_ranks=[tensor_model_parallel_rank + tp * p for p in range(pp)])

    # -- small collectives

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.tensor([float(value)], device=self.device if self.backend == "nccl" else "cpu")

    def all_reduce_max(self, value: float) -> float:
        """The maximum of a scalar over all ranks (identity in a single process)."""
        if not self.distributed:
            return value
        t = self._scalar(value)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()


def data_parallel_size_for(parallel: ParallelConfig, world_size: int) -> int:
    """World size / (TP x PP), or a ConfigError naming the flags when it does not divide."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"the world size ({world_size} processes) must be divisible by --tensor-model-parallel-size "
            f"({tp}) x --pipeline-model-parallel-size ({pp})")
    ep = parallel.expert_model_parallel_size
    if (world_size // (tp * pp)) % ep:
        raise ConfigError(f"--expert-model-parallel-size ({ep}) must divide the data-parallel size "
                          f"({world_size // (tp * pp)}): expert-parallel ranks are carved out of the data-parallel ones")
    return world_size // (tp * pp)


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but no CUDA device is visible; "
                               "use --device cpu or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _settings(parallel: ParallelConfig, virtual_pipeline_model_parallel_size: int) -> dict:
    return dict(tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
                sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
                recompute_granularity=parallel.recompute_granularity,
                recompute_method=parallel.recompute_method,
                recompute_num_layers=parallel.recompute_num_layers,
                expert_model_parallel_size=parallel.expert_model_parallel_size)


def group_ranks(tp: int, dp: int, pp: int) -> dict:
    """Global ranks of every group of each kind, in Megatron's order (see the module docstring)."""
    def index(t, d, p):
        return t + tp * (d + dp * p)

    groups = {
        "tensor_model_parallel_group": [[index(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "data_parallel_group": [[index(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pipeline_model_parallel_group": [[index(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "model_parallel_group": [[index(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
        "embedding_group": [],
    }
    if pp > 1:
        groups["embedding_group"] = [[index(t, d, 0), index(t, d, pp - 1)] for d in range(dp) for t in range(tp)]
    return groups


def _new_groups(rank: int, tp: int, dp: int, pp: int) -> dict:
    """Create every group (all ranks must create all groups, in the same order); keep ours."""
    mine = {}
    for kind, all_ranks in group_ranks(tp, dp, pp).items():
        for ranks in all_ranks:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
                if kind == "pipeline_model_parallel_group":
                    mine["pipeline_ranks"] = ranks
    return mine


def initialize(config: Optional[Config] = None) -> ParallelState:
    """Set up the device and, under a launcher, the process groups of `config`'s parallel layout."""
    config = config or Config()
    parallel, device = config.parallel, config.train.device
    backend, timeout_minutes = parallel.distributed_backend, parallel.distributed_timeout_minutes
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp = data_parallel_size_for(parallel, world_size)
    dev = _pick_device(device, local_rank)
    settings = _settings(parallel, config.virtual_pipeline_model_parallel_size)
    if world_size == 1:
        return ParallelState(device=dev, **settings)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    # torch._dynamo (which torch.optim imports) pulls in torch.distributed modules that, imported
    # after the default group exists, keep a C++ reference to it: the group and its threads would
    # then outlive `destroy` (see there). Imported first, they hold nothing.
    import torch._dynamo  # noqa: F401
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError("--distributed-backend nccl needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        kwargs = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if tp == 1 and pp == 1:
        groups = {"data_parallel_group": dist.group.WORLD, "pipeline_ranks": [rank]}
    else:
        groups = _new_groups(rank, tp, dp, pp)
        if backend == "nccl" and pp > 1:
            # Create the pipeline communicators with every member present: NCCL's first
            # point-to-point call in a group would otherwise need all of them.
            dist.barrier(group=groups["pipeline_model_parallel_group"])
    state = ParallelState(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                          backend=backend, **groups, **settings)
    if parallel.expert_model_parallel_size > 1:
        from megalm.parallel.expert import build_expert_groups
        for kind, group in build_expert_groups(state, parallel.expert_model_parallel_size).items():
            setattr(state, kind, group)
    return state


def destroy() -> None:
    """Tear down every process group before the interpreter exits.

    A Gloo group's worker threads stop only when the group's last Python reference goes, and a
    worker may still hold a finished collective's tensors; dropping them needs the interpreter.
    If that happens during interpreter shutdown the process aborts ("terminate called without an
    active exception") after a run that succeeded. So: destroy the groups, then collect the
    reference cycles (modules, hooks) that still hold them, while the interpreter is whole; the
    caller drops its own references (the trainer) first."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
