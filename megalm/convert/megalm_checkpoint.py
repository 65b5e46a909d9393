"""The megalm side of conversion: opening a checkpoint directory, its tokenizer, and writing one.

A checkpoint directory is what `pretrain_gpt.py --save` writes (`megalm.training.checkpoint`); a
path may name the root (its latest iteration is used) or one `iter_XXXXXXX` directory. Weights-only
checkpoints written here start a training run with `--load DIR --finetune`.
"""

from __future__ import annotations

import json
import os

import torch

from megalm.config import Config, ModelConfig
from megalm.convert.frame import ConversionError
from megalm.model import GPTModel
from megalm.training.checkpoint import CheckpointError, find_checkpoint, read_checkpoint, save_checkpoint


def open_checkpoint(path: str) -> dict:
    """The checkpoint at `path` (root or iter_XXXXXXX), read and verified (see `read_checkpoint`).

    A checkpoint saved with tensor, pipeline or expert parallelism is merged into the full model
    (weights only), so export and inference read every layout.
    """
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such checkpoint directory")
    from megalm.convert.reshard import checkpoint_dir, merge, saved_layout
    if saved_layout(path) != (1, 1, 1):
        merged = merge(path)
        return {"metadata": merged["metadata"], "model": merged["weights"], "optimizer": None, "rng": None,
                "path": checkpoint_dir(path)}
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return read_checkpoint(path)
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no megalm checkpoint under {path} (expected iter_XXXXXXX/ directories)")
    return found


def checkpoint_config(found: dict) -> Config:
    """The checkpoint's config, its tokenizer paths redirected to the copies the checkpoint holds
    under tokenizer/ when the original files are gone."""
    config = Config.from_dict(found["metadata"]["config"])
    copies = os.path.join(found["path"], "tokenizer")
    d = config.data
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(d, name)
        if path and not os.path.exists(path) and os.path.isdir(copies):
            copy = os.path.join(copies, os.path.basename(os.path.normpath(path)))
            setattr(d, name, copy if os.path.isfile(copy) else copies)
    return config


def build_tokenizer(config: Config):
    """The checkpoint's tokenizer, or None when it names none."""
    if config.data.tokenizer_type is None:
        return None
    from megalm.data.tokenizer import build_tokenizer as build
    return build(config.data)


def meta_model(config: ModelConfig) -> GPTModel:
    """The model without memory: its state dict gives every tensor name and shape."""
    with torch.device("meta"):
        return GPTModel(config)


def save_weights(root: str, config: Config, state: dict, extra_metadata: dict) -> str:
    """Write a weights-only checkpoint (iteration 0) of `state` under `root`; returns its directory.

    The tensors are checked against the model the config describes (names and shapes) and written
    as they are (no dtype change). `extra_metadata` is added to metadata.json, and the tokenizer
    paths in the recorded config are pointed at the copies the checkpoint now holds.
    """
    model = meta_model(config.model)
    model.load_state_dict(state, strict=True, assign=True)
    path = save_checkpoint(root, 0, model, config)
    meta_path = os.path.join(path, "metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if os.path.isdir(os.path.join(path, "tokenizer")):
        meta["config"]["data"]["tokenizer_model"] = os.path.abspath(os.path.join(path, "tokenizer"))
    meta.update(extra_metadata)
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    return path
