"""Loading a model for inference: a megalm checkpoint or a quantized model directory, its tokenizer
and its true vocabulary size, on the device and in the dtype asked for (default: bf16 on a GPU,
fp32 on CPU).

A quantized model directory (`save_quantized`) holds model.safetensors (codes, scales, zero points
and the full-precision tensors), quantization.json (format version, method and settings, true
vocabulary size, model config) and tokenizer/.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from megalm.checkpoint import checkpoint_config, checkpoint_tokenizer, open_checkpoint
from megalm.checkpoint.files import save_safetensors
from megalm.checkpoint.merge import partition_specs
from megalm.config import Config
from megalm.inference import quantize
from megalm.model import GPTModel
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import shard

QUANTIZATION_FILE = "quantization.json"
QUANTIZED_FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: GPTModel
    config: Config
    tokenizer: object  # megalm.data.tokenizer.Tokenizer, or None
    vocab_size: int  # the true vocabulary: logits beyond it are padding
    path: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def true_vocab_size(config: Config, tokenizer, recorded: Optional[int] = None) -> int:
    """The vocabulary before padding: recorded by the converter or by training (ModelConfig.vocab_size),
    else the tokenizer's or --vocab-size; the padded size when nothing says."""
    return (recorded or config.model.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
            or config.data.vocab_size or config.model.padded_vocab_size)


def load_model(path: str, device=None, dtype: Optional[str] = None,
               parallel: Optional[ParallelState] = None) -> LoadedModel:
    """The model in `path` (a megalm checkpoint root / iter directory, or a directory written by
    `save_quantized`), in eval mode. With a tensor-parallel `parallel`, this rank's shard of it."""
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    tp = parallel.tensor_model_parallel_size if parallel is not None else 1
    if os.path.isfile(os.path.join(path, QUANTIZATION_FILE)):
        if tp > 1:
            raise ValueError(f"{path} is a quantized model, which runs on one process only: load it without "
                             f"tensor parallelism")
        loaded = load_quantized(path)
    else:
        found = open_checkpoint(path)
        config = checkpoint_config(found)
        if config.model.padded_vocab_size % tp or config.model.query_groups % tp:
            raise ValueError(f"{path}: its {config.model.query_groups} key/value heads and padded vocabulary of "
                             f"{config.model.padded_vocab_size} must both divide by the tensor-parallel size {tp}: "
                             f"run on a size that divides both")
        model = GPTModel(config.model, parallel)
        model.load_state_dict(_shard(found["model"], config, parallel) if tp > 1 else found["model"])
        tokenizer = checkpoint_tokenizer(config)
        vocab = true_vocab_size(config, tokenizer, found["metadata"].get("hf", {}).get("vocab_size"))
        loaded = LoadedModel(model, config, tokenizer, vocab, found["path"])
    loaded.model.to(device=device, dtype=torch_dtype).eval()
    return loaded


def _shard(weights: dict, config: Config, parallel: ParallelState) -> dict:
    """This tensor-parallel rank's slice of every split parameter of the full model's weights."""
    specs = partition_specs(config)
    rank, size = parallel.tensor_model_parallel_rank, parallel.tensor_model_parallel_size
    return {name: shard(t, specs[name][0], rank, size, specs[name][1]) if specs.get(name) else t
            for name, t in weights.items()}


def save_quantized(path: str, model: nn.Module, config: Config, settings: dict, vocab_size: int,
                   tokenizer_dir: Optional[str] = None) -> str:
    """Write a quantized model to the directory `path` (created; must not hold one already)."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    save_safetensors(state, os.path.join(path, "model.safetensors"), metadata={"format": "megalm-quantized"})
    config_dict = config.to_dict()
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        shutil.copytree(tokenizer_dir, os.path.join(path, "tokenizer"), dirs_exist_ok=True)
        config_dict["data"]["tokenizer_model"] = os.path.abspath(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, QUANTIZATION_FILE), "w") as f:
        json.dump({"format_version": QUANTIZED_FORMAT_VERSION, "quantization": settings, "vocab_size": vocab_size,
                   "config": config_dict}, f, indent=1)
    return path


def load_quantized(path: str) -> LoadedModel:
    """The quantized model in the directory `path` (on CPU, fp32 activations)."""
    with open(os.path.join(path, QUANTIZATION_FILE)) as f:
        meta = json.load(f)
    if meta.get("format_version") != QUANTIZED_FORMAT_VERSION:
        raise ValueError(f"{path}/{QUANTIZATION_FILE} has format version {meta.get('format_version')}; "
                         f"this megalm reads {QUANTIZED_FORMAT_VERSION}")
    config = checkpoint_config({"metadata": meta, "path": path})
    settings = meta["quantization"]
    model = quantize.prepare_quantized(GPTModel(config.model), settings["method"], settings["group_size"])
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return LoadedModel(model, config, checkpoint_tokenizer(config), meta["vocab_size"], path)
