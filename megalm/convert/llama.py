"""Llama 2 / 3 (grouped-query attention, rope theta, Llama 3 rope scaling), Mistral and Qwen2.

All three are the same decoder in Hugging Face: RMSNorm, rotate-half RoPE (the same convention as
megalm, so query and key rows are copied without any permutation), SwiGLU MLP, no biases except
Qwen2's on q/k/v (megalm: --disable-bias-linear --add-qkv-bias).
"""

from __future__ import annotations

import warnings

from megalm.config import ModelConfig
from megalm.convert.frame import QKV, Architecture, Concat, ConversionError, Rule, Vocab


def rope_settings(hf: dict) -> dict:
    """rope theta and Llama 3 scaling from config.json, as transformers 4 (`rope_theta`,
    `rope_scaling`) or 5 (`rope_parameters`) writes them."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out = {"rotary_base": float(theta)}
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise ConversionError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
    out.update(rope_scaling_factor=float(scaling["factor"]),
               rope_scaling_low_freq_factor=float(scaling["low_freq_factor"]),
               rope_scaling_high_freq_factor=float(scaling["high_freq_factor"]),
               rope_scaling_original_max_position=int(scaling["original_max_position_embeddings"]))
    return out


class Llama(Architecture):
    model_type = "llama"
    hf_class = "LlamaForCausalLM"
    ignored_suffixes = ("rotary_emb.inv_freq",)
    qkv_bias = False

    def model_config(self, hf: dict) -> dict:
        if hf.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{self.hf_class} with hidden_act {hf['hidden_act']!r} is not supported "
                                  f"(megalm's SwiGLU uses silu)")
        self._check_biases(hf)
        heads = hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        max_positions = hf.get("max_position_embeddings", 2048)
        return dict(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
            num_query_groups=groups if groups != heads else None, ffn_hidden_size=hf["intermediate_size"],
            kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
            seq_length=min(max_positions, 4096), max_position_embeddings=max_positions,
            position_embedding_type="rope", normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            swiglu=True, add_bias_linear=False, add_qkv_bias=self.qkv_bias,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            attention_dropout=hf.get("attention_dropout", 0.0), hidden_dropout=0.0, **rope_settings(hf))

    def _check_biases(self, hf: dict) -> None:
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConversionError(f"{self.hf_class} with attention_bias / mlp_bias is not supported")

    def hf_config(self, config: ModelConfig, vocab_size: int) -> dict:
        rope_scaling = None
        if config.rope_scaling_factor is not None:
            rope_scaling = {"rope_type": "llama3", "factor": config.rope_scaling_factor,
                            "low_freq_factor": config.rope_scaling_low_freq_factor,
                            "high_freq_factor": config.rope_scaling_high_freq_factor,
                            "original_max_position_embeddings": config.rope_scaling_original_max_position}
        return {
            "architectures": [self.hf_class], "model_type": self.model_type, "vocab_size": vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.ffn_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.query_groups, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_positions, "rms_norm_eps": config.norm_epsilon,
            "rope_theta": config.rotary_base, "rope_scaling": rope_scaling,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
            "attention_dropout": config.attention_dropout, "initializer_range": config.init_method_std,
            **self._extra_hf_config(),
        }

    def _extra_hf_config(self) -> dict:
        return {"attention_bias": False, "mlp_bias": False}

    def matches(self, config: ModelConfig) -> bool:
        return not config.num_experts and self.decoder_matches(config)

    def decoder_matches(self, config: ModelConfig) -> bool:
        """The attention, norms and dense MLP are this family's (the MoE families reuse it)."""
        return (config.position_embedding_type == "rope" and config.normalization == "RMSNorm"
                and config.swiglu and not config.add_bias_linear and config.add_qkv_bias == self.qkv_bias)

    def rules(self, config: ModelConfig) -> list:
        layer = "model.layers.{layer}."
        rules = [
            Rule("embedding.weight", ("model.embed_tokens.weight",), Vocab()),
            Rule("layers.{layer}.input_layernorm.weight", (layer + "input_layernorm.weight",)),
            Rule("layers.{layer}.self_attention.linear_qkv.weight",
                 tuple(layer + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV()),
            Rule("layers.{layer}.self_attention.linear_proj.weight", (layer + "self_attn.o_proj.weight",)),
            Rule("layers.{layer}.pre_mlp_layernorm.weight", (layer + "post_attention_layernorm.weight",)),
            Rule("layers.{layer}.mlp.linear_fc1.weight",
                 (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"), Concat()),
            Rule("layers.{layer}.mlp.linear_fc2.weight", (layer + "mlp.down_proj.weight",)),
            Rule("final_layernorm.weight", ("model.norm.weight",)),
        ]
        if config.add_qkv_bias:
            rules.append(Rule("layers.{layer}.self_attention.linear_qkv.bias",
                              tuple(layer + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV()))
        if config.untie_embeddings_and_output_weights:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), Vocab()))
        return rules


class Mistral(Llama):
    model_type = "mistral"
    hf_class = "MistralForCausalLM"

    def model_config(self, hf: dict) -> dict:
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings", 0):
            warnings.warn(f"this Mistral uses sliding-window attention ({window} tokens); megalm attends to "
                          f"the whole context, so outputs agree only on sequences up to {window} tokens",
                          stacklevel=2)
        return super().model_config(hf)

    def _check_biases(self, hf: dict) -> None:
        pass

    def _extra_hf_config(self) -> dict:
        return {"sliding_window": None}


class Qwen2(Llama):
    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    qkv_bias = True

    def model_config(self, hf: dict) -> dict:
        if hf.get("use_sliding_window"):
            raise ConversionError("Qwen2 with use_sliding_window is not supported")
        return super().model_config(hf)

    def _check_biases(self, hf: dict) -> None:
        pass

    def _extra_hf_config(self) -> dict:
        return {"use_sliding_window": False, "sliding_window": None}
