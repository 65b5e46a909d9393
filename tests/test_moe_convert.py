"""Mixtral / Qwen2-MoE / DeepSeek-MoE <-> megalm: logits against transformers (models with random
weights from their config classes, tiny sizes, fp32) and round trips."""

import json
import os
import warnings

import pytest
import torch

from megalm.config import Config, ModelConfig
from megalm.convert import hf_to_megalm, megalm_to_hf
from megalm.convert.megalm_checkpoint import open_checkpoint, save_weights
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
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


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
