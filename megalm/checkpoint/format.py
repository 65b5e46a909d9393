"""The checkpoint directory's names, its metadata.json, and reading one checkpoint back (see the
package docstring for the layout)."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from safetensors.torch import load_file

from megalm.checkpoint.files import CHECKSUM_ALGORITHM, CheckpointError, checksum, load_torch
from megalm.config import Config

FORMAT_VERSION = 1
TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"

# Model fields that must agree between a checkpoint and the run that loads it. The position table
# is part of the shape for learned positions (checked in `check_architecture`).
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "padded_vocab_size", "position_embedding_type", "normalization", "swiglu",
    "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights",
    "rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
    "rope_scaling_original_max_position",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
)

LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
               "expert_model_parallel_size")


class LayoutMismatchError(CheckpointError):
    """A checkpoint saved under another tensor / pipeline / expert-parallel layout than the run's."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def shard_dir(tensor_model_parallel_rank: int, pipeline_model_parallel_rank: int,
              expert_model_parallel_rank: Optional[int] = None) -> str:
    """`mp_rank_TT_PPP`, or `mp_rank_TT_PPP_EEE` with an expert-parallel rank (expert parallelism > 1)."""
    name = f"mp_rank_{tensor_model_parallel_rank:02d}_{pipeline_model_parallel_rank:03d}"
    return name if expert_model_parallel_rank is None else f"{name}_{expert_model_parallel_rank:03d}"


def shard_rel(sharded: bool, expert_model_parallel_size: int, tensor_model_parallel_rank: int,
              pipeline_model_parallel_rank: int, expert_model_parallel_rank: int = 0) -> str:
    """Where a rank's weights and optimizer state sit in a checkpoint: the top ("") when it is not
    sharded, else `mp_rank_TT_PPP`, with `_EEE` under expert parallelism."""
    if not sharded:
        return ""
    return shard_dir(tensor_model_parallel_rank, pipeline_model_parallel_rank,
                     expert_model_parallel_rank if expert_model_parallel_size > 1 else None)


def layout_sizes(metadata: dict) -> tuple:
    """(tensor, pipeline, expert)-parallel sizes a checkpoint was saved with."""
    layout = metadata.get("layout", {})
    return tuple(layout.get(k, 1) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                            "expert_model_parallel_size"))


# ---------------------------------------------------------------------------------------- metadata

def read_metadata(path: str) -> dict:
    """metadata.json of the checkpoint directory `path`, with every file it lists present at its
    recorded size (a cheap check of the whole checkpoint; contents are verified as they are read)."""
    meta_path = os.path.join(path, METADATA)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {path} is not a complete megalm checkpoint")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_path} has format version {version}; this megalm reads version {FORMAT_VERSION}")
    missing = [k for k, kind in (("iteration", int), ("config", dict), ("files", dict)) if not isinstance(meta.get(k), kind)]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {', '.join(missing)}: it was not written by megalm or was "
                              f"edited by hand; restore it from a copy or use an earlier checkpoint")
    for rel, size in meta["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full} is missing from the checkpoint")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{full} is truncated or corrupt: {os.path.getsize(full)} bytes, "
                                  f"{size} expected")
    return meta


def verify_file(path: str, rel: str, metadata: dict) -> None:
    """Compare the checksum of `path`/`rel` with the one recorded at save (checkpoints written before
    checksums were recorded have none to compare)."""
    sums = metadata.get("checksums")
    if not sums or rel not in sums.get("files", {}):
        return
    if sums.get("algorithm") != CHECKSUM_ALGORITHM:
        raise CheckpointError(f"{os.path.join(path, METADATA)} records {sums.get('algorithm')} checksums; this megalm "
                              f"checks {CHECKSUM_ALGORITHM} (training can skip the check with --no-verify-checkpoint)")
    full = os.path.join(path, rel)
    if checksum(full) != sums["files"][rel]:
        raise CheckpointError(f"{full} is corrupt: its checksum does not match the one recorded when it was saved "
                              f"(the bytes changed on disk or in transfer). Copy it again from a good source (training can "
                              f"skip the check with --no-verify-checkpoint, only if you know why)")


# ---------------------------------------------------------------------------------------- reading

def load_weights(path: str, rel: str, metadata: dict, verify: bool = True) -> dict:
    """name -> tensor of a safetensors file of the checkpoint (no pickle)."""
    if verify:
        verify_file(path, rel, metadata)
    try:
        return load_file(os.path.join(path, rel))
    except Exception as e:  # safetensors and the OS raise several types for a bad file
        raise CheckpointError(f"{os.path.join(path, rel)} is corrupt ({type(e).__name__}: {e})") from e


def load_state(path: str, rel: str, metadata: dict, verify: bool = True):
    """A torch-serialised file of the checkpoint, tensors and plain containers only."""
    if verify:
        verify_file(path, rel, metadata)
    return load_torch(os.path.join(path, rel))


def read_checkpoint(path: str, rank: int = 0, model_parallel_rank: tuple = (0, 0),
                    layout: Optional[dict] = None, verify: bool = True) -> dict:
    """Load and check every part of one checkpoint directory into memory (CPU tensors).

    `model_parallel_rank` (tensor, pipeline[, expert]) picks the shard of a model- or expert-parallel
    checkpoint; with `layout` (`ParallelState.layout()`), a checkpoint of another layout raises
    LayoutMismatchError. With `verify`, every file read is checked against its recorded checksum.
    Returns {"metadata", "model" (name -> tensor), "optimizer" (None for weights only),
    "rng" (None when this rank has none), "path", "model_path"}.
    """
    meta = read_metadata(path)
    if layout is not None:
        check_layout(meta.get("layout", {}), layout, path)
    saved = meta.get("layout", {})
    shard = shard_rel(bool(saved.get("sharded")), saved.get("expert_model_parallel_size", 1), *model_parallel_rank)
    model_rel = os.path.normpath(os.path.join(shard, "model.safetensors"))
    weights = load_weights(path, model_rel, meta, verify)
    optim_rel = os.path.normpath(os.path.join(shard, "optimizer.pt"))
    optim = load_state(path, optim_rel, meta, verify) if optim_rel in meta["files"] else None
    rng_rel = os.path.join("rng", f"rank_{rank:05d}.pt")
    rng = load_state(path, rng_rel, meta, verify) if os.path.isfile(os.path.join(path, rng_rel)) else None
    return {"metadata": meta, "model": weights, "optimizer": optim, "rng": rng, "path": path,
            "model_path": os.path.join(path, model_rel)}


def list_checkpoints(root: str) -> list:
    """Iterations with a checkpoint directory under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    its = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit():
            its.append(int(name[5:]))
    return sorted(its, reverse=True)


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the `latest` pointer of `root` names, or None when there is no pointer."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt (holds {text[:40]!r}); fix it or delete it "
                              f"to choose among {list_checkpoints(root)}")
    return int(text)


def is_checkpoint_dir(path: str) -> bool:
    """Is `path` one checkpoint (an iter_XXXXXXX directory) rather than a --save root?"""
    return os.path.isfile(os.path.join(path, METADATA))


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory `path` names: itself, or the latest under a --save root."""
    if is_checkpoint_dir(path):
        return path
    latest = latest_iteration(path)
    its = list_checkpoints(path)
    if latest is not None:
        return iteration_dir(path, latest)
    if its:
        return iteration_dir(path, its[0])
    raise CheckpointError(f"no megalm checkpoint under {path} (expected iter_XXXXXXX/ directories"
                          + ("" if os.path.isdir(path) else "; the directory does not exist") + ")")


def find_checkpoint(root: str, rank: int = 0, fallback: bool = False, log=print,
                    model_parallel_rank: tuple = (0, 0), layout: Optional[dict] = None,
                    verify: bool = True,
                    first_failure: Callable[[Optional[str]], Optional[str]] = lambda message: message) -> Optional[dict]:
    """The latest checkpoint under `root` (or the checkpoint directory `root` itself), read and
    verified; None when there is none.

    With `fallback`, an unreadable latest checkpoint is reported and older ones are tried in turn;
    without it the error stops the run so that nothing is silently skipped. A layout mismatch
    always stops (see `read_checkpoint`). Each rank reads its own files: `first_failure(message)`
    gives the message of the first rank that could not read its part, or None (a collective under
    torchrun, `megalm.checkpoint.ranks.first_failure`), so that every rank stops, or falls back to the
    same earlier checkpoint, together.
    """
    if is_checkpoint_dir(root):
        candidates, root_is_checkpoint = [None], True
    else:
        candidates, root_is_checkpoint = list_checkpoints(root), False
        latest = latest_iteration(root)
        if latest is not None:
            candidates = [latest] + [i for i in candidates if i < latest]
        elif candidates:
            log(f"warning: {os.path.join(root, TRACKER)} is missing; using the newest directory, "
                f"iteration {candidates[0]}")
    if not candidates:
        return None
    errors = []
    for iteration in candidates:
        path = root if root_is_checkpoint else iteration_dir(root, iteration)
        found, error = None, None
        try:
            found = read_checkpoint(path, rank, model_parallel_rank, layout, verify)
        except LayoutMismatchError:
            raise  # read from the metadata, the same on every rank
        except CheckpointError as e:
            error = e
        message = first_failure(None if error is None else str(error))
        if message is None:
            return found
        error = error or CheckpointError(message)
        if root_is_checkpoint:  # one checkpoint was asked for: nothing to fall back to
            raise error
        if not fallback:
            raise CheckpointError(f"{error}. Pass --load-fallback to resume from the newest readable "
                                  f"earlier checkpoint instead.") from error
        log(f"warning: skipping unreadable checkpoint: {error}")
        errors.append(str(error))
    raise CheckpointError("no readable checkpoint under " + root + ": " + "; ".join(errors))


# ---------------------------------------------------------------------------------------- checks

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


def check_architecture(saved: dict, config: Config, path: str) -> None:
    """Stop with a clear message when the checkpoint's model differs from the run's."""
    mismatches = []
    for name in ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config.model, name), saved["model"].get(name)
        if ours != theirs:
            mismatches.append(f"{name}: checkpoint {theirs}, this run {ours}")
    theirs_model = Config.from_dict(saved).model
    if config.model.position_embedding_type == "learned_absolute" and \
            config.model.max_positions != theirs_model.max_positions:
        mismatches.append(f"learned position table (--max-position-embeddings, default --seq-length): "
                          f"checkpoint {theirs_model.max_positions}, this run {config.model.max_positions}")
    if not mismatches and config.model.num_experts:
        # The same MoE layers, however the pattern is written (--moe-layer-freq, --first-k-dense-replace).
        layers = range(config.model.num_layers)
        ours, theirs = ([i for i in layers if m.is_moe_layer(i)] for m in (config.model, theirs_model))
        if ours != theirs:
            mismatches.append(f"MoE layers (--moe-layer-freq, --first-k-dense-replace): checkpoint {theirs}, "
                              f"this run {ours}")
    if mismatches:
        raise CheckpointError(f"checkpoint {path} was saved with a different model ("
                              + "; ".join(mismatches) + "). Use the checkpoint's flags, or "
                              "--finetune only if the shapes agree.")
