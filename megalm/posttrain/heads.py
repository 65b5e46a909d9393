"""The heads post-training adds to a GPTModel: a reward model's `score`."""

from __future__ import annotations

from torch import nn

from megalm.config import Config
from megalm.model.init import normal_init


def add_score_head(model: nn.Module, config: Config) -> nn.Module:
    """Give the GPTModel `model` its reward head `score` (Linear(h, 1, bias=False), initialised as
    Hugging Face initialises it: normal with --init-method-std), trainable, and freeze the output
    layer, which a reward model does not use."""
    head = nn.Linear(config.model.hidden_size, 1, bias=False)
    normal_init(config.model.init_method_std)(head.weight)
    head.weight.adapter = True  # absent from the base checkpoint (see Trainer._load_weights)
    model.score = head
    if model.output_layer is not None:
        model.output_layer.weight.requires_grad_(False)
    return model
