"""Reading a whole model out of a checkpoint of any layout, for conversion, resharding and inference.

A checkpoint saved with tensor, pipeline or expert parallelism holds one shard per model- and
expert-parallel rank. `merge` joins them into the full model, weights and optimizer state alike:

- a tensor-parallel parameter is concatenated along its `partition_dim`, block by block when it is
  stacked (SwiGLU's fc1 holds [gate_shard; up_shard] per rank, the full weight [gate; up]); which
  parameters are split, and how, is read from the model itself (a model built on the meta device
  carries `partition_dim` / `partition_stacked` on every sharded parameter), so this file knows no
  parameter names;
- an expert parameter (marked `expert_parallel` on the model) holds the experts
  [e E / EP, (e + 1) E / EP) of a layer on expert-parallel rank e: the shards are concatenated
  along the expert dimension in rank order; replicated parameters are read from rank 0;
- pipeline stages hold disjoint layers under their global names, so merging them is a union;
- optimizer states are stored whole per parameter, keyed by name (see
  `megalm.parallel.distributed_optimizer`), and follow their parameter.

`open_checkpoint` gives the full weights and the metadata of any checkpoint; `checkpoint_config`
its config with the tokenizer redirected to the copy the checkpoint holds.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from megalm.checkpoint.files import CheckpointError
from megalm.checkpoint.format import checkpoint_dir, layout_sizes, load_state, load_weights, read_checkpoint, read_metadata, shard_rel
from megalm.config import Config, ModelConfig
from megalm.model import GPTModel
from megalm.parallel.distributed_optimizer import group_names
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import merge_shards


def meta_model(config: ModelConfig, state: Optional[ParallelState] = None, virtual_stage: int = 0) -> GPTModel:
    """The model (or one rank's chunk of it) without memory: its parameters give every tensor's
    name, shape and partitioning."""
    with torch.device("meta"):
        return GPTModel(config, state, virtual_stage)


def meta_chunks(config: Config, state: ParallelState) -> list:
    """Every model chunk of the rank `state` describes, on the meta device."""
    return [meta_model(config.model, state, v) for v in range(state.virtual_pipeline_model_parallel_size)]


def partition_specs(config: Config) -> Dict[str, Optional[tuple]]:
    """Full-model parameter name -> (partition_dim, stacked), or None when replicated."""
    return {name: (p.partition_dim, p.partition_stacked) if hasattr(p, "partition_dim") else None
            for name, p in meta_model(config.model).named_parameters()}


def expert_names(config: Config) -> set:
    """Names of the parameters split by expert parallelism (stacked experts, dimension 0)."""
    return {name for name, p in meta_model(config.model).named_parameters() if getattr(p, "expert_parallel", False)}


def _read_shards(src: str, meta: dict, verify: bool):
    """Weights and optimizer states keyed by (tensor, pipeline, expert-parallel rank)."""
    tp, pp, ep = layout_sizes(meta)
    sharded = meta.get("layout", {}).get("sharded")
    weights, optim = {}, {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                shard = shard_rel(sharded, ep, t, p, e)
                weights[t, p, e] = load_weights(src, os.path.join(shard, "model.safetensors"), meta, verify)
                rel = os.path.normpath(os.path.join(shard, "optimizer.pt"))
                if rel in meta["files"]:
                    optim[t, p, e] = load_state(src, rel, meta, verify)
    return tp, pp, ep, weights, optim


def _merge_ranks(shards: dict, spec: Optional[tuple], expert: bool) -> torch.Tensor:
    """One tensor of the full model from its shards {(tensor rank, expert rank): tensor}: tensor-parallel
    shards merged along their partition, then, for an expert parameter, the experts in rank order."""
    tp, ep = (max(rank[i] for rank in shards) + 1 for i in (0, 1))
    def one(e):
        return shards[0, e] if spec is None else merge_shards([shards[t, e] for t in range(tp)], *spec)
    return torch.cat([one(e) for e in range(ep)]) if expert else one(0)


def _named_legacy_state(config: Config, saved: dict) -> dict:
    """An optimizer state keyed by position (written by a single process before names were used):
    positions follow the model's parameters in `group_names` order."""
    names = sum(group_names(meta_model(config.model).named_parameters()), [])
    return {"state": {names[i]: s for i, s in saved["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in saved["param_groups"]]}


def merge(src: str, verify: bool = True, specs: Optional[Dict[str, Optional[tuple]]] = None) -> dict:
    """The full model of a checkpoint (a --save root or an iter_XXXXXXX directory), whatever its
    layout: {"weights", "optimizer" (name-keyed state or None), "scheduler", "loss_scaler",
    "metadata", "config", "source"}. `specs` (name -> partition, as `partition_specs` gives them)
    names the tensors to merge when the model holds more than its config builds (LoRA adapters,
    `megalm.posttrain.lora.partition_specs`)."""
    src = checkpoint_dir(src)
    meta = read_metadata(src)
    config = Config.from_dict(meta["config"])
    tp, pp, ep, weights, optim = _read_shards(src, meta, verify)
    specs, experts = specs or partition_specs(config), expert_names(config)
    has_optimizer = len(optim) == tp * pp * ep
    first = optim.get((0, 0, 0))
    if has_optimizer and any(isinstance(i, int) for g in first["optimizer"]["param_groups"] for i in g["params"]):
        first["optimizer"] = _named_legacy_state(config, first["optimizer"])
    full, full_state = {}, {}
    for name, spec in specs.items():
        holders = [p for p in range(pp) if name in weights[0, p, 0]]
        if not holders:
            raise CheckpointError(f"{src} has no tensor {name}")
        p = holders[0]
        full[name] = _merge_ranks({(t, e): weights[t, p, e][name] for t in range(tp) for e in range(ep)}, spec,
                                  name in experts)
        if has_optimizer:
            states = {(t, e): optim[t, p, e]["optimizer"]["state"].get(name) for t in range(tp) for e in range(ep)}
            if states[0, 0] is not None:
                merged = {}
                for key, value in states[0, 0].items():
                    if torch.is_tensor(value) and value.dim() > 0 and (spec is not None or name in experts):
                        merged[key] = _merge_ranks({r: s[key] for r, s in states.items()}, spec, name in experts)
                    else:
                        merged[key] = value
                full_state[name] = merged
    optimizer = None
    if has_optimizer:
        groups = [dict({k: v for k, v in g.items() if k != "params"}, params=names)
                  for g, names in zip(first["optimizer"]["param_groups"], group_names((n, full[n]) for n in specs))]
        optimizer = {"state": full_state, "param_groups": groups}
    return {"weights": full, "optimizer": optimizer, "metadata": meta, "config": config, "source": src,
            "scheduler": first["scheduler"] if has_optimizer else None,
            "loss_scaler": first["loss_scaler"] if has_optimizer else None}


def open_checkpoint(path: str, verify: bool = True, specs: Optional[Dict[str, Optional[tuple]]] = None) -> dict:
    """The checkpoint at `path` (root or iter_XXXXXXX), read and verified, its weights those of the
    full model whatever the layout it was saved with: {"metadata", "model", "optimizer", "rng", "path"}
    (the optimizer and RNG states only for a checkpoint saved by one process; `specs` as for `merge`)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    path = checkpoint_dir(path)
    if layout_sizes(read_metadata(path)) != (1, 1, 1):
        merged = merge(path, verify, specs)
        return {"metadata": merged["metadata"], "model": merged["weights"], "optimizer": None, "rng": None,
                "path": path}
    return read_checkpoint(path, verify=verify)


def checkpoint_config(found: dict) -> Config:
    """The checkpoint's config, its tokenizer paths redirected to the copies the checkpoint holds
    under tokenizer/ when the original files are gone. FP8 is how the weights were trained, not part
    of the model: a model read from a checkpoint runs its linears in the dtype it is loaded in (a
    fine-tuning run that wants FP8 again says --fp8-format)."""
    config = Config.from_dict(found["metadata"]["config"])
    config.model.fp8_format, config.model.first_last_layers_bf16 = None, False
    copies = os.path.join(found["path"], "tokenizer")
    d = config.data
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(d, name)
        if path and not os.path.exists(path) and os.path.isdir(copies):
            copy = os.path.join(copies, os.path.basename(os.path.normpath(path)))
            setattr(d, name, copy if os.path.isfile(copy) else copies)
    return config


def checkpoint_tokenizer(config: Config):
    """The tokenizer a checkpoint's config names, or None when it names none."""
    if config.data.tokenizer_type is None:
        return None
    from megalm.data.tokenizer import build_tokenizer
    return build_tokenizer(config.data)
