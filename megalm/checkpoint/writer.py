"""Writing a checkpoint: every rank's files under a temporary directory, then one rename.

    writer = CheckpointWriter(root, iteration)
    writer.begin()                        # the main rank: a fresh DIR/iter_XXXXXXX.tmp/
    writer.write_weights(rel, tensors)    # any rank, any number of files
    writer.write_state(rel, obj)
    writer.commit(metadata, checksums)    # the main rank, once every rank has written

`commit` records every file's size and checksum in metadata.json, renames the directory to its
final name and only then moves the `latest` pointer, so a crash at any moment leaves the previous
checkpoint usable. `save_checkpoint` drives it for a training run (all ranks), `save_weights` for
a converter (one process, weights only).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
from typing import Optional

from megalm.checkpoint.files import CHECKSUM_ALGORITHM, CheckpointError, checksum, save_safetensors, save_torch, write_text_atomic
from megalm.checkpoint.format import FORMAT_VERSION, METADATA, TRACKER, iteration_dir, shard_rel
from megalm.checkpoint.merge import meta_model
from megalm.checkpoint.ranks import on_every_rank
from megalm.checkpoint.rng import rng_state
from megalm.config import Config
from megalm.parallel.fp8 import fp8_state_dict
from megalm.parallel.state import ParallelState


class CheckpointWriter:
    def __init__(self, root: str, iteration: int):
        self.root, self.iteration = root, iteration
        self.final = iteration_dir(root, iteration)
        self.tmp = self.final + ".tmp"
        self.checksums = {}  # relative path -> checksum, of the files this process wrote

    def begin(self) -> None:
        """A fresh temporary directory; leftovers of runs killed while saving are removed first
        (their `latest` pointer temporaries and half-written iteration directories)."""
        os.makedirs(self.root, exist_ok=True)
        for leftover in glob.glob(os.path.join(glob.escape(self.root), TRACKER + ".tmp.*")):
            os.remove(leftover)
        for leftover in glob.glob(os.path.join(glob.escape(self.root), "iter_*.tmp")):
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(self.tmp)

    def _path(self, rel: str) -> str:
        path = os.path.join(self.tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _record(self, rel: str) -> None:
        self.checksums[os.path.normpath(rel)] = checksum(os.path.join(self.tmp, rel))

    def write_weights(self, rel: str, tensors: dict) -> None:
        """name -> tensor as safetensors (contiguous CPU copies are made here)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_safetensors(tensors, self._path(rel), metadata={"format": "megalm"})
        self._record(rel)

    def write_state(self, rel: str, obj) -> None:
        """Tensors and plain containers, read back with torch.load(weights_only=True)."""
        save_torch(obj, self._path(rel))
        self._record(rel)

    def copy_tokenizer(self, paths: list) -> bool:
        """Copy the tokenizer files (or a tokenizer directory) into tokenizer/; False when there are none."""
        copied = False
        for path in (p for p in paths if p):
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(self.tmp, "tokenizer"), dirs_exist_ok=True)
            elif os.path.isfile(path):
                shutil.copy2(path, self._path(os.path.join("tokenizer", os.path.basename(path))))
            else:
                continue
            copied = True
        for dirpath, _, files in os.walk(os.path.join(self.tmp, "tokenizer")):
            for name in files:
                self._record(os.path.relpath(os.path.join(dirpath, name), self.tmp))
        return copied

    def commit(self, metadata: dict, checksums: Optional[dict] = None) -> str:
        """metadata.json (with every file's size and checksum), the rename, the `latest` pointer.
        `checksums`: those of every rank's files (default: this process's)."""
        sizes = {}
        for dirpath, _, files in os.walk(self.tmp):
            for name in files:
                path = os.path.join(dirpath, name)
                sizes[os.path.relpath(path, self.tmp)] = os.path.getsize(path)
        sums = self.checksums if checksums is None else checksums
        missing = sorted(set(sizes) - set(sums))
        if missing:
            raise CheckpointError(f"files of {self.tmp} were not written through the checkpoint writer: {missing}")
        metadata = dict(metadata, format_version=FORMAT_VERSION, iteration=self.iteration, files=sizes,
                        checksums={"algorithm": CHECKSUM_ALGORITHM, "files": sums})
        write_text_atomic(os.path.join(self.tmp, METADATA), json.dumps(metadata, indent=1))
        if os.path.exists(self.final):
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        write_text_atomic(os.path.join(self.root, TRACKER), str(self.iteration))
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _gather_checksums(state: ParallelState, mine: dict) -> dict:
    if not state.distributed:
        return mine
    import torch.distributed as dist
    every = [None] * state.world_size
    dist.all_gather_object(every, mine)
    return {rel: value for sums in every for rel, value in sums.items()}


def save_checkpoint(root: str, iteration: int, model, config: Config,
                    optimizer=None, scheduler=None, scaler=None, consumed_samples: int = 0,
                    state: Optional[ParallelState] = None, extra_metadata: Optional[dict] = None) -> str:
    """Write the checkpoint of `iteration` under `root`; every rank must call it.

    `model` is a module or this rank's list of pipeline chunks. Without an optimizer the checkpoint
    holds weights only (as converters write it); such a checkpoint starts a new run with --finetune.
    `extra_metadata` is added to metadata.json. Raises CheckpointError on every rank when any rank
    cannot write its files (a full disk), after removing the partial checkpoint.
    """
    state = state or ParallelState()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    sharded = state.model_parallel or state.expert_model_parallel_size > 1
    writer = CheckpointWriter(root, iteration)

    def together(step):
        """`step` on this rank; if it fails anywhere, the partial checkpoint goes (the previous one
        is untouched) and every rank raises."""
        on_every_rank(state, step, on_failure=writer.abort if state.is_main else None)

    together(writer.begin if state.is_main else lambda: None)

    # Every rank takes part: the distributed optimizer gathers its shards over data parallelism.
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    # FP8 delayed scaling's amax history and scales (megalm.parallel.fp8); absent without them.
    fp8 = fp8_state_dict(chunks)

    def write_rank_files():
        writer.write_state(os.path.join("rng", f"rank_{state.rank:05d}.pt"), rng_state(state.rng_tracker))
        # One writer per model- and expert-parallel rank: the first rank of each expert-data-parallel
        # group (data-parallel ranks 0 .. EP - 1, megalm.parallel.expert), data-parallel rank 0 without EP.
        ep = state.expert_model_parallel_size
        if state.data_parallel_rank < ep:
            shard = shard_rel(sharded, ep, state.tensor_model_parallel_rank, state.pipeline_model_parallel_rank,
                              state.expert_model_parallel_rank)
            writer.write_weights(os.path.join(shard, "model.safetensors"),
                                 {k: v for chunk in chunks for k, v in chunk.state_dict().items()})
            if optimizer is not None:
                writer.write_state(os.path.join(shard, "optimizer.pt"),
                                   {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                    "loss_scaler": scaler.state_dict(), **({"fp8": fp8} if fp8 else {})})
        if state.is_main:
            d = config.data
            writer.copy_tokenizer([d.tokenizer_model, d.vocab_file, d.merge_file])

    together(write_rank_files)
    checksums = _gather_checksums(state, writer.checksums)
    metadata = {"consumed_samples": consumed_samples, "config": config.to_dict(),
                "layout": dict(state.layout(), sharded=sharded), **(extra_metadata or {})}
    together((lambda: writer.commit(metadata, checksums)) if state.is_main else lambda: None)
    return writer.final


def save_weights(root: str, config: Config, weights: dict, extra_metadata: Optional[dict] = None,
                 model=None) -> str:
    """A weights-only checkpoint (iteration 0) of the full model `weights` under `root`; returns its
    directory. The tensors are checked against the model the config describes (names and shapes),
    or against `model` (a module on the meta device: a model with LoRA adapters), and written as
    they are (no dtype change); the recorded config points at the tokenizer copies the checkpoint
    holds, so it stays usable when the original files move."""
    model = meta_model(config.model) if model is None else model
    model.load_state_dict(weights, strict=True, assign=True)
    recorded = copy.deepcopy(config)
    d = config.data
    if any(p and os.path.exists(p) for p in (d.tokenizer_model, d.vocab_file, d.merge_file)):
        recorded.data.tokenizer_model = os.path.abspath(os.path.join(iteration_dir(root, 0), "tokenizer"))
    return save_checkpoint(root, 0, model, config, extra_metadata=dict(extra_metadata or {},
                                                                         config=recorded.to_dict()))
