"""GPT-2: learned positions, LayerNorm, GELU (tanh approximation, "gelu_new"), biases everywhere, and
the output layer tied to the token embedding.

Its linears are `Conv1D` modules that store weights [in, out], the transpose of a Linear's, and
`attn.c_attn` holds the query, key and value rows one after the other ([q; k; v] once transposed),
which megalm regroups per head ([q0, k0, v0 | q1, k1, v1 | ...]).
"""

from __future__ import annotations

from megalm.config import ModelConfig
from megalm.convert.frame import QKV, Architecture, ConversionError, Copy, Rule, Vocab

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class GPT2(Architecture):
    model_type = "gpt2"
    hf_class = "GPT2LMHeadModel"
    # Causal-mask buffers that older transformers versions saved with the weights.
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")

    def model_config(self, hf: dict) -> dict:
        act = hf.get("activation_function", "gelu_new")
        if act not in _GELU_TANH:
            raise ConversionError(f"GPT-2 with activation_function {act!r} is not supported "
                                  f"(megalm's GELU is the tanh approximation: {', '.join(_GELU_TANH)})")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ConversionError("GPT-2 with scale_attn_weights=false or scale_attn_by_inverse_layer_idx "
                                  "is not supported")
        hidden = hf["n_embd"]
        return dict(
            num_layers=hf["n_layer"], hidden_size=hidden, num_attention_heads=hf["n_head"],
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, seq_length=hf["n_positions"],
            max_position_embeddings=hf["n_positions"], position_embedding_type="learned_absolute",
            normalization="LayerNorm", norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), swiglu=False,
            add_bias_linear=True, untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
            attention_dropout=hf.get("attn_pdrop", 0.1), hidden_dropout=hf.get("resid_pdrop", 0.1))

    def hf_config(self, config: ModelConfig, vocab_size: int) -> dict:
        return {
            "architectures": [self.hf_class], "model_type": self.model_type, "vocab_size": vocab_size,
            "n_embd": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_attention_heads,
            "n_inner": config.ffn_size, "n_positions": config.max_positions, "n_ctx": config.max_positions,
            "layer_norm_epsilon": config.norm_epsilon, "activation_function": "gelu_new",
            "attn_pdrop": config.attention_dropout, "resid_pdrop": config.hidden_dropout,
            "embd_pdrop": config.hidden_dropout, "scale_attn_weights": True,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
            "initializer_range": config.init_method_std,
        }

    def matches(self, config: ModelConfig) -> bool:
        return (not config.num_experts and config.position_embedding_type == "learned_absolute"
                and config.normalization == "LayerNorm"
                and not config.swiglu and config.add_bias_linear and config.query_groups == config.num_attention_heads
                and config.head_dim * config.num_attention_heads == config.hidden_size)

    def normalize_hf_name(self, name: str) -> str:
        # The original checkpoints were saved from GPT2Model, without the "transformer." prefix.
        return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name

    def rules(self, config: ModelConfig) -> list:
        h = "transformer.h.{layer}."
        rules = [
            Rule("embedding.weight", ("transformer.wte.weight",), Vocab()),
            Rule("position_embeddings.weight", ("transformer.wpe.weight",)),
            Rule("final_layernorm.weight", ("transformer.ln_f.weight",)),
            Rule("final_layernorm.bias", ("transformer.ln_f.bias",)),
        ]
        for megalm_name, hf_name, transform in (
                ("input_layernorm", "ln_1", Copy()), ("pre_mlp_layernorm", "ln_2", Copy()),
                ("self_attention.linear_qkv", "attn.c_attn", QKV(fused=True, conv1d=True)),
                ("self_attention.linear_proj", "attn.c_proj", Copy(conv1d=True)),
                ("mlp.linear_fc1", "mlp.c_fc", Copy(conv1d=True)),
                ("mlp.linear_fc2", "mlp.c_proj", Copy(conv1d=True))):
            for part in ("weight", "bias"):
                rules.append(Rule(f"layers.{{layer}}.{megalm_name}.{part}", (f"{h}{hf_name}.{part}",), transform))
        if config.untie_embeddings_and_output_weights:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), Vocab()))
        return rules
