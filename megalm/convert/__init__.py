"""Checkpoint conversion between megalm and Hugging Face transformers.

`hf_to_megalm` and `megalm_to_hf` convert whole directories (tools/convert_checkpoint.py is their
command line); each supported family is one table of rules on the frame of `megalm.convert.frame`
(`megalm.convert.llama`: Llama, Mistral, Qwen2; `megalm.convert.gpt2`: GPT-2).
"""

from megalm.convert.frame import ConversionError
from megalm.convert.hf import ARCHITECTURES, hf_to_megalm, megalm_to_hf

__all__ = ["ARCHITECTURES", "ConversionError", "hf_to_megalm", "megalm_to_hf"]
