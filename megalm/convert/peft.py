"""Hugging Face peft LoRA adapters <-> megalm LoRA checkpoints (Llama, Mistral, Qwen2).

A peft adapter directory holds adapter_model.safetensors and adapter_config.json. Its tensors are
named after the Hugging Face module they adapt:

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

megalm keeps one adapter per Hugging Face projection even where it fuses the base linears
(`megalm.posttrain.lora`): `layers.{i}.self_attention.linear_qkv.lora.q_proj.A` is q_proj's
lora_A. A q_proj / k_proj / v_proj B of megalm lists its rows head by head, the order of Hugging
Face's rows (the grouped QKV layout interleaves the heads of q, k and v, not the rows within a
projection), and rotate-half RoPE is the same convention on both sides, so every tensor is copied
as it is: the conversion is a renaming plus checks.

Export (`megalm_to_peft`): a LoRA checkpoint of any layout (its tensor-parallel shards merged) ->
an adapter directory `peft.PeftModel.from_pretrained(base, dir)` loads onto the Hugging Face model
of the checkpoint's base. Import (`peft_to_megalm`): an adapter directory plus the megalm
checkpoint of its base model -> a megalm LoRA checkpoint (base weights and adapters) that training
resumes from and tools/lora.py merges.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Optional

import torch
from safetensors.torch import load_file

from megalm.checkpoint import checkpoint_config, open_checkpoint, save_safetensors, save_weights
from megalm.config import Config
from megalm.convert import hf_files
from megalm.convert.frame import ConversionError
from megalm.convert.hf import architecture_for_megalm
from megalm.posttrain import lora

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FAMILIES = ("llama", "mistral", "qwen2")
PREFIX = "base_model.model.model.layers."
# Hugging Face module of each target, and the megalm linear that carries its adapter.
MODULES = {"q_proj": ("self_attn", "self_attention.linear_qkv"), "k_proj": ("self_attn", "self_attention.linear_qkv"),
           "v_proj": ("self_attn", "self_attention.linear_qkv"), "o_proj": ("self_attn", "self_attention.linear_proj"),
           "gate_proj": ("mlp", "mlp.linear_fc1"), "up_proj": ("mlp", "mlp.linear_fc1"),
           "down_proj": ("mlp", "mlp.linear_fc2")}
_MEGALM_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.lora\.(\w+)\.([AB])$")
_PEFT_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")
# adapter_config.json settings megalm's adapters cannot express, with the value that is harmless.
_UNSUPPORTED = {"fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "use_dora": False,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


def peft_name(name: str) -> str:
    """megalm adapter name -> the peft tensor name."""
    layer, _, target, which = _MEGALM_NAME.match(name).groups()
    return f"{PREFIX}{layer}.{MODULES[target][0]}.{target}.lora_{which}.weight"


def megalm_name(name: str) -> Optional[str]:
    """peft tensor name -> the megalm adapter name, None when it names no module megalm adapts."""
    match = _PEFT_NAME.match(name)
    if match is None:
        return None
    layer, module, target, which = match.groups()
    if target not in MODULES or MODULES[target][0] != module:
        return None
    return f"layers.{layer}.{MODULES[target][1]}.lora.{target}.{which}"


def _check_family(config: Config, record: dict, path: str) -> None:
    if config.model.num_experts:
        raise ConversionError(f"{path} is a mixture-of-experts model; peft adapters are converted for dense "
                              f"Llama, Mistral and Qwen2 models only")
    arch = architecture_for_megalm(config.model, record.get("model_type"))
    if arch.model_type not in FAMILIES:
        raise ConversionError(f"{path} is a {arch.hf_class} model; peft adapters are converted for "
                              f"{', '.join(FAMILIES)} models (their q_proj ... down_proj modules)")


def megalm_to_peft(src: str, dst: str, force: bool = False, base_model_name_or_path: Optional[str] = None,
                   log=print) -> str:
    """Write the adapters of the megalm LoRA checkpoint `src` as the peft adapter directory `dst`."""
    found, config = lora.open_lora_checkpoint(src)
    _check_family(config, found["metadata"].get("hf", {}), found["path"])
    tensors = {peft_name(n): t.contiguous() for n, t in found["model"].items() if lora.is_adapter(n)}
    hf_files.prepare_output_dir(dst, force)
    save_safetensors(tensors, os.path.join(dst, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    p = config.posttrain
    hf_files.write_json(os.path.join(dst, ADAPTER_CONFIG), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": p.lora_rank, "lora_alpha": p.lora_alpha, "lora_dropout": p.lora_dropout, "use_rslora": p.use_rslora,
        "target_modules": sorted(lora.resolve_targets(p.lora_target_modules)), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True})
    quantized = f" (trained on a {p.lora_base_quantization} base)" if p.lora_base_quantization else ""
    log(f"exported {len(tensors)} adapter tensors of {found['path']}{quantized} into {dst}")
    return dst


def _read_adapter_config(src: str) -> dict:
    path = os.path.join(src, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: {src} is not a peft adapter directory")
    settings = hf_files.read_json(path)
    if settings.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {settings.get('peft_type')!r}; megalm imports LORA adapters")
    # A list names modules (peft writes all-linear out as full module paths); a string is a regular
    # expression, left to the tensor names below to check.
    targets = settings.get("target_modules")
    if isinstance(targets, list):
        unknown = {t.rpartition(".")[2] for t in targets} - set(lora.TARGETS)
        if unknown:
            raise ConversionError(f"{path}: the adapter targets {', '.join(sorted(unknown))}, modules of another "
                                  f"architecture; megalm imports adapters of Llama, Mistral and Qwen2 models "
                                  f"({' '.join(lora.TARGETS)})")
    for key, harmless in _UNSUPPORTED.items():
        if settings.get(key) not in (None, harmless):
            raise ConversionError(f"{path}: {key} = {settings[key]!r} is not supported by megalm's adapters "
                                  f"(supported: {key} = {harmless!r})")
    return settings


def _load_adapter(src: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(src, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing (megalm reads safetensors adapters)")
    out = {}
    for name, tensor in load_file(path).items():
        mine = megalm_name(name)
        if mine is None:
            raise ConversionError(f"{path}: tensor {name} adapts no module of a Llama-family model (an adapter "
                                  f"for another architecture?)")
        out[mine] = tensor
    return out


def peft_to_megalm(src: str, base: str, dst: str, force: bool = False, log=print) -> str:
    """Put the peft adapter directory `src` onto the megalm checkpoint `base` of its base model; writes
    a megalm LoRA checkpoint under `dst` and returns its iteration directory."""
    if os.path.exists(dst) and not force:
        raise ConversionError(f"output directory {dst} exists; choose another or pass --force to overwrite it")
    settings = _read_adapter_config(src)
    adapters = _load_adapter(src)
    if not adapters:
        raise ConversionError(f"{os.path.join(src, ADAPTER_WEIGHTS)} holds no adapter tensor")
    targets = [t for t in lora.TARGETS if any(name.endswith(f".lora.{t}.A") for name in adapters)]
    found = open_checkpoint(base)
    config = checkpoint_config(found)
    if config.posttrain.lora_rank:
        raise ConversionError(f"{found['path']} holds LoRA adapters already; give the base model's checkpoint "
                              f"(tools/lora.py merge makes one)")
    _check_family(config, found["metadata"].get("hf", {}), found["path"])
    config = dataclasses.replace(config, posttrain=dataclasses.replace(
        config.posttrain, lora_rank=int(settings["r"]), lora_alpha=float(settings.get("lora_alpha", 8)),
        lora_dropout=float(settings.get("lora_dropout", 0.0)), use_rslora=bool(settings.get("use_rslora", False)),
        lora_target_modules=targets, lora_base_quantization=None))
    model = lora.lora_model(config, "meta")
    expected = lora.lora_state_dict(model)
    for name, tensor in adapters.items():
        if name not in expected:
            raise ConversionError(f"{src}: tensor {peft_name(name)} has no place in the base model {found['path']} "
                                  f"({config.model.num_layers} layers)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConversionError(f"{src}: tensor {peft_name(name)} has shape {tuple(tensor.shape)}, the base model "
                                  f"{found['path']} needs {tuple(expected[name].shape)}: the adapter was made for "
                                  f"another base model")
    missing = sorted(set(expected) - set(adapters))
    if missing:
        raise ConversionError(f"{src} lacks {len(missing)} adapter tensors, e.g. {peft_name(missing[0])}: megalm "
                              f"adapts a target in every layer (peft's layers_to_transform is not supported)")
    weights = dict(found["model"], **{n: t.to(found["model"]["embedding.weight"].dtype) for n, t in adapters.items()})
    model.load_state_dict(weights, strict=True, assign=True)
    record = found["metadata"].get("hf")
    path = save_weights(dst, config, weights, {"hf": record} if record else None, model=model)
    log(f"imported the rank-{config.posttrain.lora_rank} adapter {src} ({len(adapters)} tensors) onto "
        f"{found['path']} into {path}")
    return path
