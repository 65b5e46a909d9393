"""Mixture-of-experts families: Mixtral, Qwen2-MoE and DeepSeek-MoE, on the frame of `megalm.convert.frame`.

All three are the Llama decoder (`megalm.convert.llama`) with the MLP of their MoE layers replaced:

| | router | top-k weights | shared experts | dense layers |
|---|---|---|---|---|
| Mixtral | softmax, `mlp.gate` | renormalised | none | none |
| Qwen2-MoE | softmax, `mlp.gate` | `norm_topk_prob` | `mlp.shared_expert`, sigmoid `shared_expert_gate` | `mlp_only_layers`, sparse step |
| DeepSeek-MoE | softmax, `mlp.gate` | `norm_topk_prob` | `mlp.shared_experts` (n x moe size) | `first_k_dense_replace`, `moe_layer_freq` |

Experts: in memory transformers 5 holds a layer's experts fused, `mlp.experts.gate_up_proj`
[E, 2 x ffn, h] (gate half first) and `mlp.experts.down_proj` [E, h, ffn], megalm's own layout
(`experts.weight1`, `experts.weight2`). On disk, though, transformers 5 writes (and transformers 4
and DeepSeek-MoE's own modelling code wrote) one tensor per expert, and that is the layout read and
written here: Mixtral `block_sparse_moe.experts.E.w1 / w3 / w2` (gate / up / down) with the router
at `block_sparse_moe.gate`; Qwen2-MoE and DeepSeek-MoE `mlp.experts.E.gate_proj / up_proj /
down_proj` with the router at `mlp.gate`. `StackedExperts` stacks them into megalm's [E, ...]
tensors and back. A checkpoint stored in the fused in-memory layout (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, router `mlp.gate`) is read too: `unfuse_hf` splits it into the per-expert
names first.

Registered in `megalm.convert.hf.ARCHITECTURES` ahead of the dense families, so that an MoE model is
never taken for a Llama on export.
"""

from __future__ import annotations

import torch

from megalm.config import ModelConfig
from megalm.convert.frame import Concat, ConversionError, Rule, Transform
from megalm.convert.llama import Llama, Mistral, Qwen2


def routing_without_family(config: ModelConfig) -> list:
    """The routing features of `config` that none of these families has (named in the export error)."""
    reasons = []
    if config.moe_router_score_function != "softmax":
        reasons.append(f"--moe-router-score-function {config.moe_router_score_function}")
    if config.moe_router_topk_scaling_factor not in (None, 1.0):
        reasons.append(f"--moe-router-topk-scaling-factor {config.moe_router_topk_scaling_factor}")
    if config.moe_router_enable_expert_bias:
        reasons.append("--moe-router-enable-expert-bias")
    if config.moe_router_num_groups:
        reasons.append("--moe-router-num-groups")
    if config.moe_pad_expert_input_to_capacity:
        reasons.append("--moe-pad-expert-input-to-capacity")
    return reasons


class StackedExperts(Transform):
    """megalm's [E, ...] expert weights <-> one Hugging Face tensor per expert (the on-disk layout).

    `gate_up`: weight1 [E, 2 ffn, h] <-> (gate_0, up_0, gate_1, up_1, ...), each [ffn, h];
    otherwise weight2 [E, h, ffn] <-> (down_0, down_1, ...)."""

    def __init__(self, gate_up: bool):
        self.gate_up = gate_up

    def to_hf(self, tensor, ctx):
        if self.gate_up:
            return [half for expert in tensor for half in expert.chunk(2, dim=0)]
        return list(tensor.unbind(0))

    def to_megalm(self, tensors, ctx):
        if self.gate_up:
            return torch.stack([torch.cat(tensors[i:i + 2], dim=0) for i in range(0, len(tensors), 2)])
        return torch.stack(list(tensors))


class _MoEFamily:
    """The MoE part shared by the three families (mixed into their dense base class)."""

    router = "mlp.gate.weight"  # under model.layers.N.
    experts = "mlp.experts."
    expert_names = ("gate_proj", "up_proj", "down_proj")
    shared = None  # prefix of the shared experts' MLP, when the family has them

    def _moe_config(self, hf: dict) -> dict:
        raise NotImplementedError

    def unfuse_hf(self, named: dict) -> dict:
        """Per-expert tensors (or shapes) for a checkpoint holding transformers 5's fused experts:
        `model.layers.N.mlp.experts.gate_up_proj` [E, 2 ffn, h] (gate half first) and `down_proj`
        [E, h, ffn]; the router saved at `mlp.gate` moves to this family's router name."""
        gate, up, down = self.expert_names
        out = {}
        for name, value in named.items():
            layer, fused, part = name.partition("mlp.experts.")
            if not fused or part not in ("gate_up_proj", "down_proj") or not layer.startswith("model.layers."):
                if name.endswith(".mlp.gate.weight") and self.router != "mlp.gate.weight":
                    name = name[: -len("mlp.gate.weight")] + self.router
                out[name] = value
                continue
            prefix = layer + self.experts
            shape = tuple(value.shape) if torch.is_tensor(value) else tuple(value)
            for e in range(shape[0]):
                if part == "down_proj":
                    out[f"{prefix}{e}.{down}.weight"] = value[e] if torch.is_tensor(value) else shape[1:]
                    continue
                ffn = shape[1] // 2
                halves = value[e].split(ffn, dim=0) if torch.is_tensor(value) else ((ffn, shape[2]),) * 2
                out[f"{prefix}{e}.{gate}.weight"], out[f"{prefix}{e}.{up}.weight"] = halves
        return out

    def model_config(self, hf: dict) -> dict:
        out = super().model_config(hf)
        out.update(self._moe_config(hf))
        return out

    def _moe_matches(self, config: ModelConfig) -> bool:
        raise NotImplementedError

    def matches(self, config: ModelConfig) -> bool:
        return (bool(config.num_experts) and not routing_without_family(config)
                and self.decoder_matches(config) and self._moe_matches(config))

    def _expert_rules(self, i: int, layer: str, num_experts: int) -> list:
        gate, up, down = self.expert_names
        experts = range(num_experts)
        return [Rule(f"layers.{i}.mlp.experts.weight1",
                     tuple(f"{layer}{self.experts}{e}.{name}.weight" for e in experts for name in (gate, up)),
                     StackedExperts(gate_up=True)),
                Rule(f"layers.{i}.mlp.experts.weight2",
                     tuple(f"{layer}{self.experts}{e}.{down}.weight" for e in experts), StackedExperts(gate_up=False))]

    def rules(self, config: ModelConfig) -> list:
        rules = [r for r in super().rules(config) if ".mlp." not in r.megalm]
        for i in range(config.num_layers):
            layer = f"model.layers.{i}."
            if not config.is_moe_layer(i):
                rules += [Rule(f"layers.{i}.mlp.linear_fc1.weight", (layer + "mlp.gate_proj.weight",
                                                                     layer + "mlp.up_proj.weight"), Concat()),
                          Rule(f"layers.{i}.mlp.linear_fc2.weight", (layer + "mlp.down_proj.weight",))]
                continue
            rules.append(Rule(f"layers.{i}.mlp.router.weight", (layer + self.router,)))
            rules += self._expert_rules(i, layer, config.num_experts)
            if config.moe_shared_expert_intermediate_size:
                shared = layer + self.shared
                rules += [Rule(f"layers.{i}.mlp.shared_experts.linear_fc1.weight",
                               (shared + "gate_proj.weight", shared + "up_proj.weight"), Concat()),
                          Rule(f"layers.{i}.mlp.shared_experts.linear_fc2.weight", (shared + "down_proj.weight",))]
            if config.moe_shared_expert_gate:
                rules.append(Rule(f"layers.{i}.mlp.shared_expert_gate.weight", (layer + "mlp.shared_expert_gate.weight",)))
        return rules


class Mixtral(_MoEFamily, Mistral):
    model_type = "mixtral"
    hf_class = "MixtralForCausalLM"
    router = "block_sparse_moe.gate.weight"
    experts = "block_sparse_moe.experts."
    expert_names = ("w1", "w3", "w2")

    def _moe_config(self, hf: dict) -> dict:
        return dict(num_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["intermediate_size"], moe_router_norm_topk_prob=True)

    def _moe_matches(self, config: ModelConfig) -> bool:
        return (config.moe_router_norm_topk_prob and not config.moe_shared_expert_intermediate_size
                and config.moe_ffn_size == config.ffn_size
                and all(config.is_moe_layer(i) for i in range(config.num_layers)))

    def hf_config(self, config: ModelConfig, vocab_size: int) -> dict:
        out = super().hf_config(config, vocab_size)
        out.update(num_local_experts=config.num_experts, num_experts_per_tok=config.moe_router_topk,
                   router_aux_loss_coef=config.moe_aux_loss_coeff, output_router_logits=False)
        return out


class Qwen2Moe(_MoEFamily, Qwen2):
    model_type = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"
    shared = "mlp.shared_expert."

    def _moe_config(self, hf: dict) -> dict:
        # Layer i is sparse unless listed in mlp_only_layers, and only every decoder_sparse_step-th
        # layer ((i + 1) % step == 0): a first-dense prefix, or megalm's per-layer pattern.
        step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
        layers = hf["num_hidden_layers"]
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        if not any(pattern):
            raise ConversionError("this Qwen2-MoE config (decoder_sparse_step, mlp_only_layers) has no sparse layer")
        first = pattern.index(1)
        layout = (dict(first_k_dense_replace=first) if all(pattern[first:])
                  else dict(moe_layer_freq=pattern))
        shared = hf.get("shared_expert_intermediate_size") or None
        return dict(num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["moe_intermediate_size"], moe_shared_expert_intermediate_size=shared,
                    moe_shared_expert_gate=bool(shared), moe_router_norm_topk_prob=bool(hf.get("norm_topk_prob")),
                    add_qkv_bias=bool(hf.get("qkv_bias", True)), **layout)

    def _moe_matches(self, config: ModelConfig) -> bool:
        return config.moe_shared_expert_gate == bool(config.moe_shared_expert_intermediate_size)

    def hf_config(self, config: ModelConfig, vocab_size: int) -> dict:
        out = super().hf_config(config, vocab_size)
        out.update(num_experts=config.num_experts, num_experts_per_tok=config.moe_router_topk,
                   moe_intermediate_size=config.moe_ffn_size,
                   shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size or 0,
                   norm_topk_prob=config.moe_router_norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe_layer(i)], qkv_bias=True,
                   router_aux_loss_coef=config.moe_aux_loss_coeff, output_router_logits=False)
        return out


class DeepseekMoE(_MoEFamily, Llama):
    """DeepSeek-MoE (deepseek-moe-16b; model_type "deepseek", loaded with trust_remote_code)."""

    model_type = "deepseek"
    hf_class = "DeepseekForCausalLM"
    shared = "mlp.shared_experts."

    def _moe_config(self, hf: dict) -> dict:
        if hf.get("scoring_func", "softmax") != "softmax":
            raise ConversionError(f"DeepSeek-MoE with scoring_func {hf['scoring_func']!r} is not supported")
        shared = hf.get("n_shared_experts") or 0
        return dict(num_experts=hf["n_routed_experts"], moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["moe_intermediate_size"],
                    moe_shared_expert_intermediate_size=shared * hf["moe_intermediate_size"] or None,
                    moe_router_norm_topk_prob=bool(hf.get("norm_topk_prob")),
                    first_k_dense_replace=hf.get("first_k_dense_replace", 0), moe_layer_freq=hf.get("moe_layer_freq", 1))

    def _moe_matches(self, config: ModelConfig) -> bool:
        shared = config.moe_shared_expert_intermediate_size or 0
        return (not config.moe_shared_expert_gate and shared % config.moe_ffn_size == 0
                and deepseek_layer_rule(config) is not None)

    def hf_config(self, config: ModelConfig, vocab_size: int) -> dict:
        out = super().hf_config(config, vocab_size)
        out.update(n_routed_experts=config.num_experts, num_experts_per_tok=config.moe_router_topk,
                   moe_intermediate_size=config.moe_ffn_size,
                   n_shared_experts=(config.moe_shared_expert_intermediate_size or 0) // config.moe_ffn_size,
                   norm_topk_prob=config.moe_router_norm_topk_prob, scoring_func="softmax",
                   **dict(zip(("first_k_dense_replace", "moe_layer_freq"), deepseek_layer_rule(config))),
                   aux_loss_alpha=config.moe_aux_loss_coeff, seq_aux=True)
        return out


def deepseek_layer_rule(config: ModelConfig):
    """(first_k_dense_replace, moe_layer_freq) such that DeepSeek-MoE's rule (layer i is sparse when
    i >= first_k and i % freq == 0) gives `config`'s MoE layers, or None if no pair does."""
    pattern = [config.is_moe_layer(i) for i in range(config.num_layers)]
    if True not in pattern:
        return None
    first = pattern.index(True)
    for freq in range(1, config.num_layers + 1):
        if first % freq == 0 and all(p == (i >= first and i % freq == 0) for i, p in enumerate(pattern)):
            return first, freq
    return None


MOE_ARCHITECTURES = (Mixtral(), Qwen2Moe(), DeepseekMoE())


def register(architectures: dict) -> None:
    """Put the MoE families first in `architectures` (export takes the first family that matches)."""
    dense = dict(architectures)
    architectures.clear()
    architectures.update({arch.model_type: arch for arch in MOE_ARCHITECTURES})
    architectures.update(dense)
