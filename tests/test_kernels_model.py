"""A tiny GPT with every fused op forced to Triton (the interpreter on CPU, fp32) reproduces the
reference paths' loss and gradients."""

import copy
import os

import pytest
import torch

from megalm.kernels import dispatch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
gpt = pytest.importorskip("megalm.model.gpt", reason="megalm.model.gpt is not written yet")
from megalm.config import ModelConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LLAMA_STYLE = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
                   add_bias_linear=False, cross_entropy_fusion="fused")
GPT2_STYLE = dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
                  cross_entropy_fusion="unfused")
# Triton entry points each style must reach: (module, function)
EXPECTED = {
    "llama_style": [("attention", "flash_forward"), ("attention", "flash_backward"), ("norm", "norm_forward"),
                    ("rope", "rotary"), ("swiglu", "swiglu_forward"),
                    ("cross_entropy", "linear_cross_entropy_forward")],
    "gpt2_style": [("attention", "flash_forward"), ("norm", "norm_backward"), ("cross_entropy", "cross_entropy_forward")],
}


def _count_calls(monkeypatch, entry_points):
    import importlib
    calls = {}
    for module_name, function in entry_points:
        module = importlib.import_module(f"megalm.kernels._triton.{module_name}")
        original = getattr(module, function)

        def spy(*args, _original=original, _name=function, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, function, spy)
    return calls


def _loss_and_grads(model, tokens, labels, path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, path)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name,style", [("llama_style", LLAMA_STYLE), ("gpt2_style", GPT2_STYLE)])
def test_triton_paths_match_reference_paths(name, style, monkeypatch):
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=24, attention_dropout=0.0,
                         hidden_dropout=0.0, **style)
    config.padded_vocab_size = 128
    torch.manual_seed(0)
    model = gpt.GPTModel(config).to(DEVICE)
    tokens = torch.randint(0, 128, (2, 24), device=DEVICE)
    labels = torch.randint(0, 128, (2, 24), device=DEVICE)
    labels[0, :5] = -100
    want_loss, want_grads = _loss_and_grads(model, tokens, labels, "reference", monkeypatch)
    calls = _count_calls(monkeypatch, EXPECTED[name])
    got_loss, got_grads = _loss_and_grads(copy.deepcopy(model), tokens, labels, "triton", monkeypatch)
    assert set(calls) == {function for _, function in EXPECTED[name]}, calls
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
