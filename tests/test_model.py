"""The GPT model: initial loss, causality, variants, KV cache, initialisation, FLOPs."""

import math

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model import GPTModel, KVCache

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                  add_bias_linear=False, num_query_groups=2, untie_embeddings_and_output_weights=True),
    "qwen2": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                  add_bias_linear=False, add_qkv_bias=True, num_query_groups=1),
}


def model_config(**overrides):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                attention_dropout=0.0, hidden_dropout=0.0, padded_vocab_size=256)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_at_init_is_close_to_ln_vocab(variant):
    torch.manual_seed(0)
    model = GPTModel(model_config(**VARIANTS[variant]))
    tokens = torch.randint(0, 256, (4, 33))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - math.log(256)) < 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_do_not_change_past_logits(variant):
    torch.manual_seed(0)
    model = GPTModel(model_config(**VARIANTS[variant])).eval()
    a = torch.randint(0, 256, (2, 16))
    b = a.clone()
    b[:, 10:] = torch.randint(0, 256, (2, 6))
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_matches_full_forward(variant):
    torch.manual_seed(0)
    config = model_config(**VARIANTS[variant])
    model = GPTModel(config).eval()
    tokens = torch.randint(0, 256, (2, 12))
    full = model(tokens)
    cache = KVCache(config, batch_size=2, max_len=12)
    parts = [model(tokens[:, :7], kv_cache=cache)]
    for i in range(7, 12):
        parts.append(model(tokens[:, i:i + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPTModel(model_config(**VARIANTS["llama"]))
    tokens = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_ignored_labels_do_not_count():
    torch.manual_seed(0)
    model = GPTModel(model_config())
    tokens = torch.randint(0, 256, (2, 17))
    labels = tokens[:, 1:].clone()
    full = model(tokens[:, :-1], labels)
    labels[:, 8:] = -100
    logits = model(tokens[:, :-1])[:, :8]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), labels[:, :8].reshape(-1))
    torch.testing.assert_close(model(tokens[:, :-1], labels), expected)
    assert not torch.allclose(full, expected)


def test_scaled_init_of_output_projections():
    torch.manual_seed(0)
    config = model_config(num_layers=8, hidden_size=256, init_method_std=0.02)
    model = GPTModel(config)
    layer = model.layers[0]
    scaled = 0.02 / math.sqrt(2 * 8)
    assert layer.self_attention.linear_qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attention.linear_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.linear_fc2.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.linear_fc1.bias.abs().max().item() == 0.0
    assert torch.all(layer.input_layernorm.weight == 1)


def test_tied_and_untied_output_layer():
    tied = GPTModel(model_config())
    assert tied.output_weight is tied.embedding.weight
    assert "output_layer.weight" not in tied.state_dict()
    untied = GPTModel(model_config(untie_embeddings_and_output_weights=True))
    assert untied.output_weight is not untied.embedding.weight
    assert "output_layer.weight" in untied.state_dict()


def test_gqa_shapes_and_parameter_count():
    config = model_config(num_attention_heads=8, num_query_groups=2, add_bias_linear=False)
    model = GPTModel(config)
    qkv = model.layers[0].self_attention.linear_qkv.weight
    assert qkv.shape == ((8 + 2 * 2) * 8, 64)
    expected = (256 * 64 + 32 * 64  # embeddings
                + 2 * (2 * 2 * 64  # two LayerNorms (weight + bias)
                       + qkv.numel() + 64 * 64 + 2 * 64 * 256)  # qkv, proj, fc1, fc2
                + 2 * 64)  # final norm
    assert model.num_parameters() == expected


def test_flops_per_token_matches_six_n_plus_attention():
    config = model_config(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=64,
                          padded_vocab_size=512)
    model = GPTModel(config)
    h, L, s, V = 128, 4, 64, 512
    matmul_params = L * (3 * h * h + h * h + 8 * h * h) + V * h
    assert model.flops_per_token() == 6 * matmul_params + 3 * L * 4 * s * h


def test_learned_positions_reject_too_long_sequences():
    model = GPTModel(model_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="longer than the model's 16 learned positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rope_extends_beyond_its_table():
    torch.manual_seed(0)
    model = GPTModel(model_config(**VARIANTS["llama"], max_position_embeddings=8)).eval()
    logits = model(torch.randint(0, 256, (1, 20)))
    assert logits.shape == (1, 20, 256) and torch.isfinite(logits).all()
