"""Reading and writing Hugging Face model directories: weights, config.json, tokenizer files.

Weights are safetensors, one `model.safetensors` or shards `model-00001-of-00003.safetensors` with
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {name: file}}), as
`save_pretrained` writes them. Every tensor is written once and owns its memory (safetensors refuses
tensors that share storage; a tied output layer is simply not written, as Hugging Face does).
`pytorch_model.bin` checkpoints are read too (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch
from safetensors import safe_open

from megalm.checkpoint.files import load_torch, save_safetensors
from megalm.convert.frame import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Tokenizer files carried between a Hugging Face directory and a checkpoint's tokenizer/.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def parse_size(text) -> int:
    """'5GB', '500MB', '10KB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot read the size {text!r} (examples: 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


def _weight_files(directory: str) -> list:
    for index in (SAFETENSORS_INDEX, TORCH_INDEX):
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            files = sorted(set(read_json(path)["weight_map"].values()))
            return [os.path.join(directory, f) for f in files]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin"):
        found = sorted(glob.glob(os.path.join(directory, pattern)))
        if found:
            return found
    raise ConversionError(f"no weights in {directory}: expected model.safetensors, sharded safetensors with "
                          f"{SAFETENSORS_INDEX}, or pytorch_model.bin")


def tensor_shapes(directory: str) -> dict:
    """name -> shape of every tensor in the directory, read from the headers only."""
    shapes = {}
    for path in _weight_files(directory):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        else:
            for name, t in _load_torch(path).items():
                shapes[name] = tuple(t.shape)
    return shapes


def _load_torch(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing (named by the index)")
    return load_torch(path)


def load_tensors(directory: str) -> dict:
    out = {}
    for path in _weight_files(directory):
        if not os.path.isfile(path):
            raise ConversionError(f"{path} is missing (named by the index)")
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        else:
            out.update(_load_torch(path))
    return out


def save_tensors(tensors: dict, directory: str, max_shard_size: int) -> list:
    """Write `tensors` as safetensors shards of at most max_shard_size bytes (a larger tensor gets a
    shard of its own); returns the file names written."""
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(names, shards):
        save_safetensors({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in shard.items()},
                         os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(os.path.join(directory, SAFETENSORS_INDEX),
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return names


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def prepare_output_dir(path: str, force: bool) -> None:
    """Refuse an existing output directory unless `force`; with `force`, drop old weight files there
    (a stale shard would otherwise be read with the new ones)."""
    if os.path.exists(path) and not force:
        raise ConversionError(f"output directory {path} exists; choose another or pass --force to overwrite it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"output path {path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    for pattern in ("*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", TORCH_INDEX):
        for old in glob.glob(os.path.join(path, pattern)):
            os.remove(old)


def copy_tokenizer_files(src: str, dst: str) -> list:
    """Copy the known tokenizer files found in `src` into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
