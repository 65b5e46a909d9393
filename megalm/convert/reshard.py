"""Reshard a megalm checkpoint to another tensor / pipeline / expert-parallel layout.

    reshard("ckpt_tp2_pp2", "ckpt_tp1_pp1", target_tp=1, target_pp=1)

The source's shards (one per model-parallel rank, `mp_rank_TT_PPP/`, or per model- and
expert-parallel rank, `mp_rank_TT_PPP_EEE/`) are merged into the full model, then split for the
target layout, weights and optimizer state alike:

- a tensor-parallel parameter is concatenated / split along its `partition_dim`, block by block
  when it is stacked (SwiGLU's fc1 holds [gate_shard; up_shard] per rank, the full weight
  [gate; up]); which parameters are split, and how, is read from the model itself (a model built on
  the meta device carries `partition_dim` / `partition_stacked` on every sharded parameter), so
  this file knows no parameter names;
- an expert parameter (marked `expert_parallel` on the model, like `partition_dim`) holds the
  experts [e E / EP, (e + 1) E / EP) of a layer on expert-parallel rank e: the shards are
  concatenated along the expert dimension in rank order, the order in which the model numbers them;
  replicated parameters are read from expert-parallel rank 0;
- pipeline stages hold disjoint layers under their global names, so merging them is a union;
  the last stage's copy of a tied embedding (`output_layer.weight`) is dropped and rebuilt from
  the embedding for a target whose last stage needs it;
- optimizer states are stored whole per parameter, keyed by name (see
  `megalm.parallel.distributed_optimizer`), and follow their parameter;
- the padded vocabulary is re-padded for the target tensor-parallel size (Megatron's rule:
  a multiple of --make-vocab-size-divisible-by x TP) when the true vocabulary size is known.

The iteration, consumed samples, scheduler and loss-scale states carry over, so training resumes
where it stopped. Per-rank RNG states do not (the ranks differ): the resumed run warns and goes on.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from megalm.config import Config, pad_vocab_size
from megalm.convert.frame import ConversionError
from megalm.model import GPTModel
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import merge_shards, shard
from megalm.training import checkpoint as ckpt

VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def checkpoint_dir(path: str) -> str:
    """The iteration directory `path` names: itself, or the latest under a --save root."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    tracker = os.path.join(path, ckpt.TRACKER)
    its = ckpt.list_checkpoints(path)
    if os.path.isfile(tracker):
        return ckpt.iteration_dir(path, int(open(tracker).read().strip()))
    if its:
        return ckpt.iteration_dir(path, its[0])
    raise ConversionError(f"no megalm checkpoint under {path} (expected iter_XXXXXXX/ directories)")


def _meta_models(config: Config, state: ParallelState) -> list:
    with torch.device("meta"):
        return [GPTModel(config.model, state, v) for v in range(state.virtual_pipeline_model_parallel_size)]


def _partition_specs(config: Config) -> Dict[str, tuple]:
    """Full-model parameter name -> (partition_dim, stacked), or None when replicated."""
    specs = {}
    for model in _meta_models(config, ParallelState()):
        for name, p in model.named_parameters():
            specs[name] = (p.partition_dim, p.partition_stacked) if hasattr(p, "partition_dim") else None
    return specs


def _expert_names(config: Config) -> set:
    """Names of the parameters split by expert parallelism (stacked experts, dimension 0)."""
    return {name for model in _meta_models(config, ParallelState())
            for name, p in model.named_parameters() if getattr(p, "expert_parallel", False)}


def _expert_shard(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The experts of expert-parallel rank `rank` of `size`: rows [rank E / size, (rank + 1) E / size)."""
    return t.chunk(size)[rank]


def _true_vocab_size(config: Config) -> Optional[int]:
    if config.data.vocab_size:
        return config.data.vocab_size
    if config.data.tokenizer_type in (None, "NullTokenizer"):
        return None
    try:
        from megalm.data.tokenizer import build_tokenizer
        return build_tokenizer(config.data).vocab_size
    except Exception:  # the tokenizer files may be gone: keep the padding as it is
        return None


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def _read_shards(src: str, meta: dict):
    """Weights and optimizer states keyed by (tensor, pipeline, expert-parallel rank)."""
    tp, pp, ep = _layout_sizes(meta)
    weights, optim = {}, {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                name = ckpt.shard_dir(t, p, e if ep > 1 else None)
                where = os.path.join(src, name) if meta.get("layout", {}).get("sharded") else src
                weights[t, p, e] = load_file(os.path.join(where, "model.safetensors"))
                path = os.path.join(where, "optimizer.pt")
                if os.path.isfile(path):
                    optim[t, p, e] = torch.load(path, map_location="cpu", weights_only=True)
    return tp, pp, ep, weights, optim


def _layout_sizes(meta: dict) -> tuple:
    layout = meta.get("layout", {})
    return tuple(layout.get(k, 1) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                            "expert_model_parallel_size"))


def saved_layout(path: str) -> tuple:
    """(tensor-parallel size, pipeline-parallel size, expert-parallel size) of the checkpoint at `path`."""
    return _layout_sizes(ckpt._read_metadata(checkpoint_dir(path)))


def _merge_ranks(shards: dict, spec: Optional[tuple], expert: bool) -> torch.Tensor:
    """One tensor of the full model from its shards {(tensor rank, expert rank): tensor}: tensor-parallel
    shards merged along their partition, then, for an expert parameter, the experts in rank order."""
    tp, ep = (max(rank[i] for rank in shards) + 1 for i in (0, 1))
    def one(e):
        return shards[0, e] if spec is None else merge_shards([shards[t, e] for t in range(tp)], *spec)
    return torch.cat([one(e) for e in range(ep)]) if expert else one(0)


def merge(src: str) -> dict:
    """The full model of a checkpoint, whatever its layout: {"weights", "optimizer" (name-keyed
    state or None), "scheduler", "loss_scaler", "metadata", "config"}."""
    src = checkpoint_dir(src)
    meta = ckpt._read_metadata(src)
    config = Config.from_dict(meta["config"])
    tp, pp, ep, weights, optim = _read_shards(src, meta)
    specs, experts = _partition_specs(config), _expert_names(config)
    has_optimizer = len(optim) == tp * pp * ep
    first = optim.get((0, 0, 0))
    if has_optimizer and any(isinstance(i, int) for g in first["optimizer"]["param_groups"] for i in g["params"]):
        # Keyed by position (written by a single process before names were used): positions follow
        # megalm.training.optimizer.param_groups, the decay group (matrices) then the rest.
        named = list(_meta_models(config, ParallelState())[0].named_parameters())
        names = [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]
        first["optimizer"] = {"state": {names[i]: s for i, s in first["optimizer"]["state"].items()},
                              "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                               for g in first["optimizer"]["param_groups"]]}
    full, full_state = {}, {}
    for name, spec in specs.items():
        holders = [p for p in range(pp) if name in weights[0, p, 0]]
        if not holders:
            raise ConversionError(f"{src} has no tensor {name}")
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
        groups = [dict({k: v for k, v in g.items() if k != "params"},
                       params=[n for n in specs if (full[n].dim() >= 2) == (i == 0)])
                  for i, g in enumerate(first["optimizer"]["param_groups"])]
        optimizer = {"state": full_state, "param_groups": groups}
    return {"weights": full, "optimizer": optimizer, "metadata": meta, "config": config, "source": src,
            "scheduler": first["scheduler"] if has_optimizer else None,
            "loss_scaler": first["loss_scaler"] if has_optimizer else None}


def reshard(src_dir: str, dst_dir: str, target_tp: int = 1, target_pp: int = 1,
            target_num_layers_per_virtual_pipeline_stage: Optional[int] = None, target_ep: int = 1,
            force: bool = False, log=print) -> str:
    """Write the checkpoint of `src_dir` (a --save root or an iter_XXXXXXX directory) under `dst_dir`
    for tensor-parallel size `target_tp`, pipeline-parallel size `target_pp` and expert-parallel
    size `target_ep`; returns the iteration directory written. Train from it with the target's
    --tensor-model-parallel-size / --pipeline-model-parallel-size (and
    --num-layers-per-virtual-pipeline-stage) / --expert-model-parallel-size and --load dst_dir."""
    if os.path.exists(dst_dir) and not force:
        raise ConversionError(f"output directory {dst_dir} exists; choose another or pass --force to overwrite it")
    merged = merge(src_dir)
    config, meta = merged["config"], merged["metadata"]
    m, par = config.model, config.parallel
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = target_tp, target_pp
    par.num_layers_per_virtual_pipeline_stage = target_num_layers_per_virtual_pipeline_stage
    par.sequence_parallel = par.sequence_parallel and target_tp > 1
    par.expert_model_parallel_size = target_ep
    try:
        config._validate_parallel()
        config._validate_moe()
    except ValueError as e:
        raise ConversionError(f"cannot reshard to this layout: {e}") from e
    if target_ep != 1 and (target_ep < 1 or not m.num_experts or m.num_experts % target_ep):
        raise ConversionError(f"cannot reshard to this layout: the target expert-parallel size ({target_ep}) must "
                              f"divide the number of experts ({m.num_experts})")
    if m.padded_vocab_size % target_tp:
        true_vocab = _true_vocab_size(config)
        if true_vocab is None:
            raise ConversionError(f"the padded vocabulary ({m.padded_vocab_size}) is not divisible by the target "
                                  f"tensor-parallel size {target_tp}, and the true vocabulary size is unknown")
        m.padded_vocab_size = pad_vocab_size(true_vocab, m.make_vocab_size_divisible_by, target_tp)
    weights, state = merged["weights"], (merged["optimizer"] or {}).get("state", {})
    for name in VOCAB_PARAMS:
        if name in weights:
            weights[name] = _resize_rows(weights[name], m.padded_vocab_size)
            for key, value in state.get(name, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[name][key] = _resize_rows(value, m.padded_vocab_size)
    vp = config.virtual_pipeline_model_parallel_size

    iteration = meta["iteration"]
    final = ckpt.iteration_dir(dst_dir, iteration)
    if os.path.exists(dst_dir):
        shutil.rmtree(dst_dir)
    tmp = final + ".tmp"
    os.makedirs(tmp)
    sharded = target_tp * target_pp * target_ep > 1
    tied = not m.untie_embeddings_and_output_weights
    for t, p, e in itertools.product(range(target_tp), range(target_pp), range(target_ep)):
        layout = ParallelState.for_layout(target_tp, target_pp, vp, t, p)
        out, out_state = {}, {}

        def split(value: torch.Tensor, spec: Optional[tuple], expert: bool) -> torch.Tensor:
            value = _expert_shard(value, e, target_ep) if expert else value
            return (value if spec is None else shard(value, spec[0], t, target_tp, spec[1])).contiguous().clone()

        for model in _meta_models(config, layout):
            for name, param in model.named_parameters():
                source = "embedding.weight" if tied and name == "output_layer.weight" else name
                spec = (param.partition_dim, param.partition_stacked) if hasattr(param, "partition_dim") else None
                expert = getattr(param, "expert_parallel", False)
                out[name] = split(weights[source], spec, expert)
                if source in state:
                    out_state[name] = {k: (split(v, spec, expert) if (spec is not None or expert) and torch.is_tensor(v)
                                           and v.dim() > 0 else v)
                                       for k, v in state[source].items()}
        where = os.path.join(tmp, ckpt.shard_dir(t, p, e if target_ep > 1 else None)) if sharded else tmp
        os.makedirs(where, exist_ok=True)
        save_file(out, os.path.join(where, "model.safetensors"), metadata={"format": "megalm"})
        if merged["optimizer"] is not None:
            groups = [dict(g, params=[n for n in g["params"] if n in out]) for g in merged["optimizer"]["param_groups"]]
            if tied and "output_layer.weight" in out:
                groups[0]["params"].append("output_layer.weight")
            torch.save({"optimizer": {"state": out_state, "param_groups": groups},
                        "scheduler": merged["scheduler"], "loss_scaler": merged["loss_scaler"]},
                       os.path.join(where, "optimizer.pt"))
    tokenizer = os.path.join(merged["source"], "tokenizer")
    if os.path.isdir(tokenizer):
        shutil.copytree(tokenizer, os.path.join(tmp, "tokenizer"))
    sizes = {}
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            path = os.path.join(dirpath, name)
            sizes[os.path.relpath(path, tmp)] = os.path.getsize(path)
    layout = ParallelState.for_layout(target_tp, target_pp, vp).layout()
    # The smallest run that loads it: expert-parallel ranks are data-parallel ranks.
    metadata = dict(meta, config=config.to_dict(), files=sizes,
                    layout=dict(layout, expert_model_parallel_size=target_ep, data_parallel_size=target_ep,
                                world_size=target_tp * target_pp * target_ep, sharded=sharded),
                    resharded_from=meta.get("layout"))
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=1)
    os.replace(tmp, final)
    with open(os.path.join(dst_dir, ckpt.TRACKER), "w") as f:
        f.write(str(iteration))
    tp, pp, ep = _layout_sizes(meta)
    log(f"resharded {merged['source']} (TP={tp}, PP={pp}" + (f", EP={ep}" if ep > 1 else "") + f") into {final} "
        f"(TP={target_tp}, PP={target_pp}" + (f", virtual PP={vp}" if vp > 1 else "")
        + (f", EP={target_ep}" if target_ep > 1 else "") + ")")
    return final
