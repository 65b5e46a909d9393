"""Mixtral / Qwen2-MoE / DeepSeek-MoE <-> megalm: logits against transformers (models with random
weights from their config classes, tiny sizes, fp32) and round trips."""

import json
import os
import re
import warnings

import pytest
import torch

from megalm.checkpoint import open_checkpoint, save_weights
from megalm.config import Config, ModelConfig
from megalm.convert import hf_to_megalm, megalm_to_hf
from megalm.model import GPTModel
from tests.test_convert import VOCAB, load_megalm, quiet, save_hf

transformers = pytest.importorskip("transformers", reason="conversion tests compare with transformers")

SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, bos_token_id=0, eos_token_id=1, initializer_range=0.1)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0])),
    # every second layer sparse, minus one listed as dense: megalm's per-layer pattern [0, 1, 0, 0, 0, 1]
    "qwen2_moe_sparse_step": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                              dict(num_hidden_layers=6, intermediate_size=96, moe_intermediate_size=24,
                                   shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                   norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3])),
}


def hf_moe(arch: str, seed: int = 0):
    config_class, model_class, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**SMALL, **extra})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def expert_tensors(block):
    """(w1 [E, 2 ffn, h] gate half first, w2 [E, h, ffn]) of a transformers MoE block: fused
    (transformers 5) or one module per expert (transformers 4)."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):
        return experts.gate_up_proj, experts.down_proj
    return (torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]),
            torch.stack([e.down_proj.weight for e in experts]))


def convert(hf_dir, ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_to_megalm(hf_dir, ckpt, **quiet())


def max_logit_diff(hf, ckpt) -> float:
    model = load_megalm(ckpt)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(tokens)[..., :VOCAB] - hf(tokens).logits).abs().max().item()


@pytest.fixture(scope="module", params=list(ARCHS))
def converted(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = hf_moe(arch)
    hf_dir = save_hf(model, str(root / "hf"))
    ckpt = str(root / "megalm")
    convert(hf_dir, ckpt)
    return arch, model, hf_dir, ckpt


def test_moe_logits_match_transformers(converted):
    arch, hf, _, ckpt = converted
    assert max_logit_diff(hf, ckpt) <= 1e-4
    if arch == "qwen2_moe_sparse_step":
        config = Config.from_dict(open_checkpoint(ckpt)["metadata"]["config"]).model
        assert config.moe_layer_freq == [0, 1, 0, 0, 0, 1] and config.first_k_dense_replace == 0


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 models hold one module per expert; the fused "
                                                "layout this test saves is transformers 5's in-memory one")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpoint_with_fused_experts_imports(arch, tmp_path):
    """Weights saved in transformers 5's in-memory layout (experts fused into gate_up_proj /
    down_proj, router at mlp.gate) convert to the same model as the per-expert files."""
    from safetensors.torch import save_file
    model = hf_moe(arch, seed=3)
    fused = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in fused)
    hf_dir = tmp_path / "fused"
    hf_dir.mkdir()
    model.config.save_pretrained(str(hf_dir))
    save_file(fused, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    fused_ckpt, ckpt = str(tmp_path / "from_fused"), str(tmp_path / "from_per_expert")
    convert(str(hf_dir), fused_ckpt)
    convert(save_hf(model, str(tmp_path / "hf")), ckpt)
    assert max_logit_diff(model, fused_ckpt) <= 1e-4
    a, b = open_checkpoint(fused_ckpt)["model"], open_checkpoint(ckpt)["model"]
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_moe_round_trip_is_bitwise_and_loads_in_transformers(converted, tmp_path):
    arch, hf, _, ckpt = converted
    out = str(tmp_path / "hf")
    megalm_to_hf(ckpt, out, **quiet())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == getattr(transformers, ARCHS[arch][0]).model_type
    convert(out, str(tmp_path / "back"))
    before, after = open_checkpoint(ckpt)["model"], open_checkpoint(str(tmp_path / "back"))["model"]
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        # compared with the original loaded the same way (transformers 4 computes a model built by
        # its constructor and one loaded by from_pretrained differently, by a few 1e-7)
        original = transformers.AutoModelForCausalLM.from_pretrained(converted[2]).eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


def test_deepseek_moe_export_and_import_per_expert(tmp_path):
    config = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, swiglu=True,
                         add_bias_linear=False, ffn_hidden_size=64, num_experts=4, moe_router_topk=2,
                         moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=32, first_k_dense_replace=1,
                         moe_router_norm_topk_prob=True, padded_vocab_size=128, normalization="RMSNorm",
                         position_embedding_type="rope", untie_embeddings_and_output_weights=True)
    torch.manual_seed(0)
    model = GPTModel(config)
    ckpt = save_weights(str(tmp_path / "megalm"), Config(model=config), model.state_dict(), {})
    out = str(tmp_path / "hf")
    megalm_to_hf(ckpt, out, architecture="deepseek", **quiet())
    with open(os.path.join(out, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["n_routed_experts"] == 4 and hf_config["n_shared_experts"] == 2
    assert hf_config["first_k_dense_replace"] == 1
    from megalm.convert.hf_files import tensor_shapes
    names = tensor_shapes(out)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense first layer
    convert(out, str(tmp_path / "back"))
    back = open_checkpoint(str(tmp_path / "back"))["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back[name]), name


def deepseek_moe_reference(layers: int = 4, first_k_dense: int = 1, freq: int = 1, seed: int = 0):
    """DeepSeek-MoE (the deepseek-moe-16b architecture, loaded with trust_remote_code, so without a
    class in transformers) assembled from transformers' own modules: Llama's decoder, whose
    attention and dense MLP are DeepSeek-MoE's, with the MLP of every MoE layer replaced by
    DeepSeek-V2's MoE block configured as DeepSeek-MoE's (softmax scores, greedy top-k, weights
    neither renormalised nor scaled, n shared experts as one MLP of n x moe_intermediate_size).
    Returns (model, the HF config dict of model_type "deepseek" describing it)."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    moe_block = getattr(modeling_deepseek_v2, "DeepseekV2Moe", None) or modeling_deepseek_v2.DeepseekV2MoE  # 5 / 4
    torch.manual_seed(seed)
    base = dict(SMALL, num_hidden_layers=layers, intermediate_size=96, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
    moe = dict(n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, n_shared_experts=2)
    v2 = transformers.DeepseekV2Config(hidden_size=SMALL["hidden_size"], **moe, routed_scaling_factor=1.0,
                                       topk_method="greedy", hidden_act="silu", mlp_bias=False)
    for i in range(layers):
        if i >= first_k_dense and i % freq == 0:
            block = moe_block(v2)
            with torch.no_grad():
                for p in block.parameters():  # the router starts at zero and the experts uninitialised
                    p.copy_(torch.randn_like(p) * 0.1)
            model.model.layers[i].mlp = block
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config = dict(model.config.to_dict(), model_type="deepseek", architectures=["DeepseekForCausalLM"],
                  norm_topk_prob=False, scoring_func="softmax", first_k_dense_replace=first_k_dense,
                  moe_layer_freq=freq, **moe)
    return model, config


@pytest.mark.parametrize("first_k_dense, freq", [(1, 1), (0, 2)])
def test_deepseek_moe_logits_match_transformers_modules(tmp_path, first_k_dense, freq):
    """A DeepSeek-MoE checkpoint (in memory layout: experts fused, as transformers' modules hold
    them) imports with logits matching the reference within 1e-4, and exports back to the
    per-expert files DeepSeek-MoE's own code reads, which import to the same weights."""
    from safetensors.torch import save_file
    model, config = deepseek_moe_reference(first_k_dense=first_k_dense, freq=freq)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with open(hf_dir / "config.json", "w") as f:
        json.dump(config, f)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(hf_dir / "model.safetensors"),
              metadata={"format": "pt"})
    ckpt = str(tmp_path / "megalm")
    convert(str(hf_dir), ckpt)
    imported = Config.from_dict(open_checkpoint(ckpt)["metadata"]["config"]).model
    assert imported.moe_shared_expert_intermediate_size == 48 and not imported.moe_router_norm_topk_prob
    assert max_logit_diff(model, ckpt) <= 1e-4
    out = str(tmp_path / "exported")
    megalm_to_hf(ckpt, out, **quiet())
    from megalm.convert.hf_files import tensor_shapes
    names = tensor_shapes(out)
    moe_layer = 1 if first_k_dense else 0
    assert f"model.layers.{moe_layer}.mlp.experts.5.gate_proj.weight" in names
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert (exported["model_type"], exported["first_k_dense_replace"], exported["moe_layer_freq"]) == \
        ("deepseek", first_k_dense, freq)
    convert(out, str(tmp_path / "back"))
    before, after = open_checkpoint(ckpt)["model"], open_checkpoint(str(tmp_path / "back"))["model"]
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("extra, reason", [
    (dict(moe_router_score_function="sigmoid"), "none routes with --moe-router-score-function sigmoid"),
    (dict(moe_router_enable_expert_bias=True), "none routes with --moe-router-enable-expert-bias"),
])
def test_moe_model_without_a_family_is_refused_with_the_reason(tmp_path, extra, reason):
    """Never written as a dense family without its experts: the export names what no MoE family has."""
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, swiglu=True,
                         add_bias_linear=False, ffn_hidden_size=64, num_experts=4, moe_router_topk=2,
                         moe_ffn_hidden_size=16, padded_vocab_size=128, normalization="RMSNorm",
                         position_embedding_type="rope", untie_embeddings_and_output_weights=True, **extra)
    ckpt = save_weights(str(tmp_path / "megalm"), Config(model=config), GPTModel(config).state_dict(), {})
    from megalm.convert.frame import ConversionError
    with pytest.raises(ConversionError, match=re.escape(reason)):
        megalm_to_hf(ckpt, str(tmp_path / "hf"), **quiet())
    assert not os.path.exists(tmp_path / "hf")


def test_deepseek_v3_routing_matches_transformers_moe_block():
    """Sigmoid scores, the expert bias (e_score_correction_bias), group-limited choice, renormalised
    and scaled weights, shared experts: megalm's MoE layer equals transformers' DeepseekV3MoE with
    the same weights (k / group_topk = 2: the sum of each group's top two, as there)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # transformers 4 and 5

    from megalm.model.moe import MoELayer
    torch.manual_seed(0)
    h, e, f = 32, 16, 24
    v3 = transformers.DeepseekV3Config(hidden_size=h, n_routed_experts=e, num_experts_per_tok=4, n_group=4,
                                       topk_group=2, moe_intermediate_size=f, n_shared_experts=2,
                                       norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu")
    reference = DeepseekV3MoE(v3).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        reference.gate.e_score_correction_bias.copy_(torch.randn(e) * 0.05)
    config = ModelConfig(num_layers=1, hidden_size=h, num_attention_heads=4, seq_length=16, swiglu=True,
                         add_bias_linear=False, num_experts=e, moe_router_topk=4, moe_ffn_hidden_size=f,
                         moe_shared_expert_intermediate_size=2 * f, moe_router_score_function="sigmoid",
                         moe_router_norm_topk_prob=True, moe_router_topk_scaling_factor=2.5,
                         moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                         padded_vocab_size=64)
    layer = MoELayer(config, 0).eval()
    shared = reference.shared_experts
    with torch.no_grad():
        layer.router.weight.copy_(reference.gate.weight)
        layer.router.expert_bias.copy_(reference.gate.e_score_correction_bias)
        weight1, weight2 = expert_tensors(reference)
        layer.experts.weight1.copy_(weight1)
        layer.experts.weight2.copy_(weight2)
        layer.shared_experts.linear_fc1.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        layer.shared_experts.linear_fc2.weight.copy_(shared.down_proj.weight)
    x = torch.randn(2, 24, h)
    with torch.no_grad():
        routed = reference.gate(x)  # (logits, weights, indices) in transformers 5, (indices, weights) in 4
        want_weights, want_indices = (routed[1], routed[2]) if len(routed) == 3 else (routed[1], routed[0])
        _, weights, indices, _ = layer.router(x.reshape(-1, h))
        assert torch.equal(indices.sort(-1).values, want_indices.sort(-1).values)
        torch.testing.assert_close(weights.gather(1, indices.argsort(-1)), want_weights.gather(1, want_indices.argsort(-1)))
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
