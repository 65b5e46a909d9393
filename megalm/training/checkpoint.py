"""Checkpoints: atomic, safe to load, and complete enough to continue the exact loss curve.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt     the iteration of the newest complete checkpoint
    DIR/iter_0000100/metadata.json            format version, iteration, consumed samples, config,
                                              parallel layout, byte size of every file
    DIR/iter_0000100/model.safetensors        model weights (no pickle)
    DIR/iter_0000100/optimizer.pt             optimizer, LR scheduler and loss-scaler state
    DIR/iter_0000100/rng/rank_00000.pt        python / numpy / torch / cuda RNG states of each rank
                                              (and its tensor-parallel RNG tracker's states)
    DIR/iter_0000100/tokenizer/               copies of the tokenizer files named by the config

A model-parallel run (tensor- or pipeline-parallel size above 1) writes one shard per
model-parallel rank instead of the two files at the top, as Megatron-LM does:

    DIR/iter_0000100/mp_rank_TT_PPP/model.safetensors    that rank's weights, full-model names
    DIR/iter_0000100/mp_rank_TT_PPP/optimizer.pt         that rank's optimizer state

With expert parallelism (size above 1) the shard directory also carries the expert-parallel rank,
`mp_rank_TT_PPP_EEE/` (Megatron-LM's name). Each holds that rank's whole state: the replicated
weights and its own E / EP experts of every MoE layer (`experts.weight1` [E / EP, 2 x ffn, h], the
experts numbered from EEE x E / EP), with their optimizer state. It is written by the first rank
of its expert-data-parallel group, so each expert shard is written once; the replicated weights
are stored EP times, as in Megatron-LM (the experts dominate an MoE model's size).

The metadata's `layout` records the tensor / pipeline / virtual-pipeline / expert-parallel sizes.
A checkpoint loads only into the same layout (the data-parallel size may change: optimizer states
are stored whole, keyed by parameter name); `tools/convert_checkpoint.py --loader megalm --saver
megalm --target-tensor-parallel-size N --target-pipeline-parallel-size M
--target-expert-model-parallel-size K` reshards it (`megalm.convert.reshard`).

A checkpoint is written under `iter_XXXXXXX.tmp`, renamed once every rank has finished, and only
then does the `latest` pointer move (itself written to a temporary file and renamed), so a crash at
any moment leaves the previous checkpoint usable. Loading never unpickles arbitrary objects:
weights come from safetensors and the rest through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megalm.config import Config
from megalm.parallel.state import ParallelState

FORMAT_VERSION = 1
TRACKER = "latest_checkpointed_iteration.txt"

# Model fields that must agree between a checkpoint and the run that loads it.
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "padded_vocab_size", "position_embedding_type", "normalization", "swiglu",
    "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights",
    "rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
    "rope_scaling_original_max_position",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class LayoutMismatchError(CheckpointError):
    """A checkpoint saved under another tensor / pipeline / expert-parallel layout than the run's."""


LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
               "expert_model_parallel_size")


def shard_dir(tensor_model_parallel_rank: int, pipeline_model_parallel_rank: int,
              expert_model_parallel_rank: Optional[int] = None) -> str:
    """`mp_rank_TT_PPP`, or `mp_rank_TT_PPP_EEE` with an expert-parallel rank (expert parallelism > 1)."""
    name = f"mp_rank_{tensor_model_parallel_rank:02d}_{pipeline_model_parallel_rank:03d}"
    return name if expert_model_parallel_rank is None else f"{name}_{expert_model_parallel_rank:03d}"


def check_layout(saved: dict, layout: dict, path: str) -> None:
    """Stop with the resharding command when `saved` (a metadata layout) differs from `layout`."""
    theirs = [saved.get(k, 1) for k in LAYOUT_KEYS]
    ours = [layout.get(k, 1) for k in LAYOUT_KEYS]
    if theirs == ours:
        return
    expert = theirs[3] > 1 or ours[3] > 1  # named only for expert-parallel checkpoints or runs
    def describe(sizes):
        return (f"TP={sizes[0]}, PP={sizes[1]}" + (f", virtual PP={sizes[2]}" if sizes[2] > 1 else "")
                + (f", EP={sizes[3]}" if expert else ""))
    root = os.path.dirname(os.path.normpath(path))
    vp = ("" if ours[2] == 1 else " --target-num-layers-per-virtual-pipeline-stage "
          "(your --num-layers-per-virtual-pipeline-stage)")
    ep = f" --target-expert-model-parallel-size {ours[3]}" if expert else ""
    target = f"{root}_tp{ours[0]}_pp{ours[1]}" + (f"_ep{ours[3]}" if expert else "")
    raise LayoutMismatchError(
        f"{path} was saved with {describe(theirs)}; this run uses {describe(ours)}. Reshard it first:\n"
        f"  python tools/convert_checkpoint.py --loader megalm --saver megalm --load-dir {root} "
        f"--save-dir {target} --target-tensor-parallel-size {ours[0]} "
        f"--target-pipeline-parallel-size {ours[1]}{vp}{ep}\n"
        f"then resume with --load {target} (or run with the checkpoint's "
        f"--tensor-model-parallel-size / --pipeline-model-parallel-size"
        + (" / --expert-model-parallel-size)" if expert else ")"))


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(tracker=None) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tracker is not None and tracker.states:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict, tracker=None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_states(state["tracker"])


def _copy_tokenizer_files(config: Config, dest: str) -> None:
    d = config.data
    paths = [p for p in (d.tokenizer_model, d.vocab_file, d.merge_file) if p]
    for path in paths:
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dest, "tokenizer"), dirs_exist_ok=True)
        elif os.path.isfile(path):
            os.makedirs(os.path.join(dest, "tokenizer"), exist_ok=True)
            shutil.copy2(path, os.path.join(dest, "tokenizer", os.path.basename(path)))


def save_checkpoint(root: str, iteration: int, model, config: Config,
                    optimizer=None, scheduler=None, scaler=None, consumed_samples: int = 0,
                    state: Optional[ParallelState] = None) -> str:
    """Write the checkpoint of `iteration` under `root`; every rank must call it.

    `model` is a module or this rank's list of pipeline chunks. Without an optimizer the checkpoint
    holds weights only (as converters write it); such a checkpoint starts a new run with --finetune.
    """
    state = state or ParallelState()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    sharded = state.model_parallel or state.expert_model_parallel_size > 1
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if state.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # left over by a run that died while saving
        os.makedirs(os.path.join(tmp, "rng"))
    state.barrier()

    torch.save(rng_state(state.rng_tracker), os.path.join(tmp, "rng", f"rank_{state.rank:05d}.pt"))
    # Every rank takes part: the distributed optimizer gathers its shards over data parallelism.
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    # One writer per model- and expert-parallel rank: the first rank of each expert-data-parallel
    # group (data-parallel ranks 0 .. EP - 1, megalm.parallel.expert), data-parallel rank 0 without EP.
    ep = state.expert_model_parallel_size
    if state.data_parallel_rank < ep:
        dest = os.path.join(tmp, shard_dir(state.tensor_model_parallel_rank, state.pipeline_model_parallel_rank,
                                           state.expert_model_parallel_rank if ep > 1 else None)) if sharded else tmp
        os.makedirs(dest, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for chunk in chunks for k, v in chunk.state_dict().items()}
        save_file(weights, os.path.join(dest, "model.safetensors"), metadata={"format": "megalm"})
        if optimizer is not None:
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "loss_scaler": scaler.state_dict()}, os.path.join(dest, "optimizer.pt"))
    if state.is_main:
        _copy_tokenizer_files(config, tmp)
    state.barrier()

    if state.is_main:
        sizes = {}
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                path = os.path.join(dirpath, name)
                sizes[os.path.relpath(path, tmp)] = os.path.getsize(path)
        metadata = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "config": config.to_dict(),
            "layout": dict(state.layout(), sharded=sharded),
            "files": sizes,
        }
        _atomic_write_text(os.path.join(tmp, "metadata.json"), json.dumps(metadata, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, TRACKER), str(iteration))
    state.barrier()
    return final


def _read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {path} is not a complete megalm checkpoint")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format version {meta.get('format_version')}; this "
                              f"megalm reads version {FORMAT_VERSION}")
    for rel, size in meta["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full} is missing from the checkpoint")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{full} is truncated or corrupt: {os.path.getsize(full)} bytes, "
                                  f"{size} expected")
    return meta


def read_checkpoint(path: str, rank: int = 0, model_parallel_rank: tuple = (0, 0),
                    layout: Optional[dict] = None) -> dict:
    """Load and check every part of one checkpoint directory into memory (CPU tensors).

    `model_parallel_rank` (tensor, pipeline[, expert]) picks the shard of a model- or expert-parallel
    checkpoint; with `layout` (`ParallelState.layout()`), a checkpoint of another layout raises
    LayoutMismatchError.
    Returns {"metadata", "model" (name -> tensor), "optimizer" (None for weights only),
    "rng" (None when this rank has none), "path", "model_path"}.
    """
    meta = _read_metadata(path)
    if layout is not None:
        check_layout(meta.get("layout", {}), layout, path)
    saved = meta.get("layout", {})
    if saved.get("sharded"):
        tensor_rank, pipeline_rank, *expert_rank = model_parallel_rank
        expert = (expert_rank[0] if expert_rank else 0) if saved.get("expert_model_parallel_size", 1) > 1 else None
        path_of_shard = os.path.join(path, shard_dir(tensor_rank, pipeline_rank, expert))
    else:
        path_of_shard = path
    model_path = os.path.join(path_of_shard, "model.safetensors")
    try:
        weights = load_file(model_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{model_path} is corrupt ({e})") from e
    opt_path = os.path.join(path_of_shard, "optimizer.pt")
    optim = None
    if os.path.relpath(opt_path, path) in meta["files"]:
        try:
            optim = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad archive
            raise CheckpointError(f"{opt_path} is corrupt ({type(e).__name__}: {e})") from e
    rng_path = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    rng = None
    if os.path.isfile(rng_path):
        try:
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{rng_path} is corrupt ({type(e).__name__}: {e})") from e
    return {"metadata": meta, "model": weights, "optimizer": optim, "rng": rng, "path": path,
            "model_path": model_path}


def list_checkpoints(root: str) -> list:
    """Iterations with a checkpoint directory under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    its = []
    for name in os.listdir(root):
        if name.startswith("iter_") and not name.endswith(".tmp") and name[5:].isdigit():
            its.append(int(name[5:]))
    return sorted(its, reverse=True)


def find_checkpoint(root: str, rank: int = 0, fallback: bool = False, log=print,
                    model_parallel_rank: tuple = (0, 0), layout: Optional[dict] = None) -> Optional[dict]:
    """The latest checkpoint under `root`, read and verified; None when there is none.

    With `fallback`, an unreadable latest checkpoint is reported and older ones are tried in turn;
    without it the error stops the run so that nothing is silently skipped. A layout mismatch
    always stops (see `read_checkpoint`).
    """
    tracker = os.path.join(root, TRACKER)
    candidates = list_checkpoints(root)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} is corrupt (holds {text[:40]!r}); fix it or delete it "
                                  f"to choose among {candidates}")
        latest = int(text)
        candidates = [latest] + [i for i in candidates if i < latest]
    elif candidates:
        log(f"warning: {tracker} is missing; using the newest directory, iteration {candidates[0]}")
    if not candidates:
        return None
    errors = []
    for iteration in candidates:
        try:
            return read_checkpoint(iteration_dir(root, iteration), rank, model_parallel_rank, layout)
        except LayoutMismatchError:
            raise
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}. Pass --load-fallback to resume from the newest readable "
                                      f"earlier checkpoint instead.") from e
            log(f"warning: skipping unreadable checkpoint: {e}")
            errors.append(str(e))
    raise CheckpointError("no readable checkpoint under " + root + ": " + "; ".join(errors))


def check_architecture(saved: dict, config: Config, path: str) -> None:
    """Stop with a clear message when the checkpoint's model differs from the run's."""
    mismatches = []
    for name in ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config.model, name), saved["model"].get(name)
        if ours != theirs:
            mismatches.append(f"{name}: checkpoint {theirs}, this run {ours}")
    if not mismatches and config.model.num_experts:
        # The same MoE layers, however the pattern is written (--moe-layer-freq, --first-k-dense-replace).
        theirs_model = Config.from_dict(saved).model
        layers = range(config.model.num_layers)
        ours, theirs = ([i for i in layers if m.is_moe_layer(i)] for m in (config.model, theirs_model))
        if ours != theirs:
            mismatches.append(f"MoE layers (--moe-layer-freq, --first-k-dense-replace): checkpoint {theirs}, "
                              f"this run {ours}")
    if mismatches:
        raise CheckpointError(f"checkpoint {path} was saved with a different model ("
                              + "; ".join(mismatches) + "). Use the checkpoint's flags, or "
                              "--finetune only if the shapes agree.")
