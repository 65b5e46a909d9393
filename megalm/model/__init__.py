"""GPT model family: dense decoder built from the tensor-parallel layers."""

from megalm.model.attention import KVCache
from megalm.model.gpt import IGNORE_INDEX, GPTModel

__all__ = ["GPTModel", "KVCache", "IGNORE_INDEX"]
