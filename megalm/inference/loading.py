"""Loading a model for inference: a megalm checkpoint or a quantized model directory, its tokenizer
and its true vocabulary size, on the device and in the dtype asked for (default: bf16 on a GPU,
fp32 on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megalm.config import Config
from megalm.convert.megalm_checkpoint import build_tokenizer, checkpoint_config, open_checkpoint
from megalm.model import GPTModel


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
    return (recorded or (tokenizer.vocab_size if tokenizer is not None else None) or config.data.vocab_size
            or config.model.padded_vocab_size)


def load_model(path: str, device=None, dtype: Optional[str] = None) -> LoadedModel:
    """The model in `path` (a megalm checkpoint root / iter directory, or a directory written by
    `megalm.inference.quantize.save_quantized`), in eval mode."""
    from megalm.inference import quantize
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if os.path.isfile(os.path.join(path, quantize.QUANTIZATION_FILE)):
        loaded = quantize.load_quantized(path)
    else:
        found = open_checkpoint(path)
        config = checkpoint_config(found)
        model = GPTModel(config.model)
        model.load_state_dict(found["model"])
        tokenizer = build_tokenizer(config)
        vocab = true_vocab_size(config, tokenizer, found["metadata"].get("hf", {}).get("vocab_size"))
        loaded = LoadedModel(model, config, tokenizer, vocab, found["path"])
    loaded.model.to(device=device, dtype=torch_dtype).eval()
    return loaded
