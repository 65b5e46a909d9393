"""Checkpoint conversion between megalm and Hugging Face transformers.

`hf_to_megalm` and `megalm_to_hf` convert whole directories (tools/convert_checkpoint.py is their
command line); each supported family is one table of rules on the frame of `megalm.convert.frame`
(`megalm.convert.llama`: Llama, Mistral, Qwen2; `megalm.convert.gpt2`: GPT-2;
`megalm.convert.moe_mappings`: Mixtral, Qwen2-MoE, DeepSeek-MoE).
"""

from megalm.convert.frame import ConversionError
from megalm.convert.hf import ARCHITECTURES, hf_to_megalm, megalm_to_hf
from megalm.convert.moe_mappings import register as _register_moe

_register_moe(ARCHITECTURES)  # Mixtral, Qwen2-MoE, DeepSeek-MoE (megalm.convert.moe_mappings)

__all__ = ["ARCHITECTURES", "ConversionError", "hf_to_megalm", "megalm_to_hf"]
