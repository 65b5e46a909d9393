"""Reshard a megalm checkpoint to another tensor / pipeline / expert-parallel layout.

    reshard("ckpt_tp2_pp2", "ckpt_tp1_pp1", target_tp=1, target_pp=1)

The source's shards are merged into the full model (`megalm.checkpoint.merge`), then split for
the target layout, weights and optimizer state alike: a tensor-parallel parameter along its
`partition_dim` (read from the model built on the meta device), an expert parameter along its
expert dimension; the last stage's copy of a tied embedding (`output_layer.weight`) is rebuilt
from the embedding for a target whose last stage needs it; the padded vocabulary is re-padded for
the target tensor-parallel size (Megatron's rule: a multiple of --make-vocab-size-divisible-by x
TP) when the true vocabulary size is known. The result is written through
`megalm.checkpoint.CheckpointWriter`, like a training checkpoint.

The iteration, consumed samples, scheduler and loss-scale states carry over, so training resumes
where it stopped. Per-rank RNG states do not (the ranks differ): the resumed run warns and goes on.
A LoRA checkpoint's adapters are split like their base linears (`megalm.posttrain.lora`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from typing import Optional

import torch

from megalm import checkpoint as ckpt
from megalm.config import Config, ConfigError, pad_vocab_size
from megalm.convert.frame import ConversionError
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import shard
from megalm.posttrain import lora

VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def _expert_shard(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The experts of expert-parallel rank `rank` of `size`: rows [rank E / size, (rank + 1) E / size)."""
    return t.chunk(size)[rank]


def _true_vocab_size(config: Config) -> Optional[int]:
    if config.model.vocab_size:
        return config.model.vocab_size
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


def saved_layout(path: str) -> tuple:
    """(tensor-parallel size, pipeline-parallel size, expert-parallel size) of the checkpoint at `path`."""
    return ckpt.layout_sizes(ckpt.read_metadata(ckpt.checkpoint_dir(path)))


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
    saved = Config.from_dict(ckpt.read_metadata(ckpt.checkpoint_dir(src_dir))["config"])
    merged = ckpt.merge(src_dir, specs=lora.partition_specs(saved) if saved.posttrain.lora_rank else None)
    config, meta = merged["config"], merged["metadata"]
    m, par = config.model, config.parallel
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = target_tp, target_pp
    par.num_layers_per_virtual_pipeline_stage = target_num_layers_per_virtual_pipeline_stage
    par.sequence_parallel = par.sequence_parallel and target_tp > 1
    par.expert_model_parallel_size = target_ep
    try:
        config.validate_layout()
    except ConfigError as e:
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

    iteration = meta["iteration"]
    writer = ckpt.CheckpointWriter(dst_dir, iteration)
    writer.begin()
    try:
        _write_shards(writer, merged, config, target_tp, target_pp, target_ep)
        sharded = target_tp * target_pp * target_ep > 1
        layout = ParallelState.for_layout(target_tp, target_pp, config.virtual_pipeline_model_parallel_size).layout()
        # The smallest run that loads it: expert-parallel ranks are data-parallel ranks.
        metadata = dict({k: v for k, v in meta.items() if k not in ("files", "checksums")}, config=config.to_dict(),
                        layout=dict(layout, expert_model_parallel_size=target_ep, data_parallel_size=target_ep,
                                    world_size=target_tp * target_pp * target_ep, sharded=sharded),
                        resharded_from=meta.get("layout"))
        final = writer.commit(metadata)
    except BaseException:
        writer.abort()
        raise
    for other in ckpt.list_checkpoints(dst_dir):  # what --force overwrote
        if other != iteration:
            shutil.rmtree(ckpt.iteration_dir(dst_dir, other))
    vp = config.virtual_pipeline_model_parallel_size
    tp, pp, ep = ckpt.layout_sizes(meta)
    log(f"resharded {merged['source']} (TP={tp}, PP={pp}" + (f", EP={ep}" if ep > 1 else "") + f") into {final} "
        f"(TP={target_tp}, PP={target_pp}" + (f", virtual PP={vp}" if vp > 1 else "")
        + (f", EP={target_ep}" if target_ep > 1 else "") + ")")
    return final


def _meta_chunks(config: Config, layout: ParallelState) -> list:
    """The target rank's chunks on the meta device, with the adapters of a LoRA checkpoint."""
    chunks = ckpt.meta_chunks(config, layout)
    if config.posttrain.lora_rank:
        for chunk in chunks:
            lora.apply_lora(chunk, dataclasses.replace(config.posttrain, lora_base_quantization=None), layout)
    return chunks


def _write_shards(writer: ckpt.CheckpointWriter, merged: dict, config: Config, target_tp: int, target_pp: int,
                  target_ep: int) -> None:
    """Every target rank's weights and optimizer state, split from the merged full model."""
    weights, state = merged["weights"], (merged["optimizer"] or {}).get("state", {})
    sharded = target_tp * target_pp * target_ep > 1
    tied = not config.model.untie_embeddings_and_output_weights
    for t, p, e in itertools.product(range(target_tp), range(target_pp), range(target_ep)):
        layout = ParallelState.for_layout(target_tp, target_pp, config.virtual_pipeline_model_parallel_size, t, p)
        out, out_state = {}, {}

        def split(value: torch.Tensor, spec: Optional[tuple], expert: bool) -> torch.Tensor:
            value = _expert_shard(value, e, target_ep) if expert else value
            return (value if spec is None else shard(value, spec[0], t, target_tp, spec[1])).contiguous().clone()

        for model in _meta_chunks(config, layout):
            for name, param in model.named_parameters():
                source = "embedding.weight" if tied and name == "output_layer.weight" else name
                spec = (param.partition_dim, param.partition_stacked) if hasattr(param, "partition_dim") else None
                expert = getattr(param, "expert_parallel", False)
                out[name] = split(weights[source], spec, expert)
                if source in state:
                    out_state[name] = {k: (split(v, spec, expert) if (spec is not None or expert) and torch.is_tensor(v)
                                           and v.dim() > 0 else v)
                                       for k, v in state[source].items()}
        where = ckpt.shard_rel(sharded, target_ep, t, p, e)
        writer.write_weights(os.path.join(where, "model.safetensors"), out)
        if merged["optimizer"] is not None:
            groups = [dict(g, params=[n for n in g["params"] if n in out]) for g in merged["optimizer"]["param_groups"]]
            if tied and "output_layer.weight" in out:
                groups[0]["params"].append("output_layer.weight")
            writer.write_state(os.path.join(where, "optimizer.pt"),
                               {"optimizer": {"state": out_state, "param_groups": groups},
                                "scheduler": merged["scheduler"], "loss_scaler": merged["loss_scaler"]})
    writer.copy_tokenizer([os.path.join(merged["source"], "tokenizer")])
