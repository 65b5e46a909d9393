"""Weight-only quantization: storage, error bounds, GPTQ against round-to-nearest, perplexity of a
trained model, save / load and the command line.

The model-level tests train a small Llama-shaped model (2 layers, hidden 128, SwiGLU 256) for a few
seconds on the source of `argparse` (a real text, 34k BPE tokens) and measure perplexity on held-out
text. Stated margins against the unquantized model: int8 within 0.5%, int4 and gptq-int4 (group
128, asymmetric) within 3%; GPTQ no worse than round-to-nearest int4 on its calibration sequences.
The same margins hold for an MoE model of the same shape (4 experts, top-2, one shared expert),
whose routed experts are quantized per expert.
"""

import argparse
import ast
import copy
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from megalm.config import Config, DataConfig, ModelConfig
from megalm.inference import evaluate, loading, quantize
from megalm.inference.quantize import QuantizedLinear, pack_int4, quantize_gptq, quantize_rtn, unpack_int4
from megalm.model import GPTModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64


def test_int4_packing_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 1].item() << 4)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 128, True), (4, 32, False), (4, 32, True), (4, 64, False)])
def test_round_to_nearest_error_is_bounded_by_the_step(bits, group_size, symmetric):
    """Half a step; a whole step at the ends of an asymmetric range (its zero point is rounded)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    codes, scales, zeros = quantize_rtn(linear.weight.detach(), bits, group_size, symmetric)
    q = QuantizedLinear(128, 48, bits, group_size, bias=True)
    q.set_codes(codes, scales, zeros)
    q.bias.data.copy_(linear.bias.detach())
    step = q.scales.float().repeat_interleave(q.group_size, dim=1)
    bound = step if not symmetric else step / 2
    error = (q.dequantize() - linear.weight).abs()
    assert (error <= bound + 1e-6).all() and error.mean() < step.mean() / 3
    x = torch.randn(3, 7, 128)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantize(), linear.bias), atol=1e-6)
    assert q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_layer_outputs_better_than_rounding(act_order):
    """GPTQ's objective, ||X W^T - X Q^T||, on correlated calibration inputs (activations of real
    models are close to low rank); the result does not depend on the block size (lazy updates)."""
    torch.manual_seed(0)
    n_in, n_out = 256, 64
    x = torch.randn(4096, 32) @ torch.randn(32, n_in) + 0.3 * torch.randn(4096, n_in)
    w = torch.randn(n_out, n_in) * 0.05
    hessian = 2 * x.t() @ x

    def error(codes, scales, zeros):
        q = QuantizedLinear(n_in, n_out, 4, 64, bias=False)
        q.set_codes(codes, scales, zeros)
        return (x @ w.t() - x @ q.dequantize().t()).norm().item()

    rtn = error(*quantize_rtn(w, 4, 64, False))
    codes = quantize_gptq(w, hessian, 4, 64, act_order=act_order)
    assert error(*codes) < 0.5 * rtn
    assert torch.equal(codes[0], quantize_gptq(w, hessian, 4, 64, act_order=act_order, block_size=16)[0])


def test_gptq_of_uncorrelated_inputs_is_close_to_rounding():
    """With H proportional to the identity there is nothing to compensate: GPTQ rounds to nearest."""
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    codes, scales, zeros = quantize_gptq(w, torch.eye(128), 4, 32, damp=0.0)
    expected = quantize_rtn(w, 4, 32, False)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])


# ---- a small trained model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, train ids, valid ids, root with the checkpoint) for a model trained in seconds."""
    return _train(tmp_path_factory.mktemp("quantize"))


@pytest.fixture(scope="module")
def trained_moe(tmp_path_factory):
    """The same, with a mixture of 4 SwiGLU experts (top-2, FFN 128) and a shared expert per layer."""
    return _train(tmp_path_factory.mktemp("quantize_moe"), num_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=128, moe_shared_expert_intermediate_size=128)


def _train(root, **moe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megalm.checkpoint import save_checkpoint
    text = open(argparse.__file__, encoding="utf-8").read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    ids = tok.encode(text).ids
    split = int(len(ids) * 0.9)
    train, valid = torch.tensor(ids[:split]), ids[split:]

    torch.manual_seed(0)
    config = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256, seq_length=SEQ,
                         position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                         attention_dropout=0.0, hidden_dropout=0.0, padded_vocab_size=512, **moe)
    model = GPTModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    steps, batch = 200, 8
    for step in range(steps):
        starts = torch.randint(0, split - SEQ - 1, (batch,))
        x = torch.stack([train[i:i + SEQ] for i in starts])
        y = torch.stack([train[i + 1:i + SEQ + 1] for i in starts])
        for group in optimizer.param_groups:
            group["lr"] = 5e-3 * (1 - step / steps)
        loss = model(x, labels=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    full = Config(model=config, data=DataConfig(tokenizer_type="HuggingFaceTokenizer",
                                                tokenizer_model=str(root / "tokenizer.json")))
    save_checkpoint(str(root / "ckpt"), steps, model, full)
    (root / "valid.txt").write_text(tok.decode(valid))
    (root / "train.txt").write_text(tok.decode(ids[:split]))
    return model, train, valid, root


def _ppl(model, tokens):
    return evaluate.perplexity(model, tokens, SEQ, SEQ // 2, 512, batch_size=8, progress=False)["perplexity"]


def _calibration(train):
    return [train[i:i + SEQ][None] for i in range(0, 32 * SEQ, SEQ)]


def test_quantized_perplexity_within_margins(trained):
    model, train, valid, _ = trained
    base = _ppl(model, valid)
    assert base < 80  # learned something (a uniform model has 512)
    margins = {"int8": 0.005, "int4": 0.03, "gptq-int4": 0.03}
    for method, margin in margins.items():
        q = quantize.quantize_model(copy.deepcopy(model), method, _calibration(train))
        assert abs(_ppl(q, valid) / base - 1) <= margin, method


def test_gptq_no_worse_than_rounding_on_calibration_sequences(trained):
    model, train, _, _ = trained
    calibration = _calibration(train)
    tokens = [t for c in calibration for t in c[0].tolist()]
    rtn = quantize.quantize_model(copy.deepcopy(model), "int4")
    gptq = quantize.quantize_model(copy.deepcopy(model), "gptq-int4", calibration)
    # Score each calibration sequence on its own (disjoint windows of SEQ tokens).
    nll = lambda m: sum(evaluate.stream_nll(m, tokens[i:i + SEQ], SEQ, SEQ - 1, 512, progress=False)[0]  # noqa: E731
                        for i in range(0, len(tokens), SEQ))
    assert nll(gptq) <= nll(rtn)


def test_quantized_model_replaces_the_layer_linears_only_and_is_smaller(trained):
    model, _, _, _ = trained
    q = quantize.quantize_model(copy.deepcopy(model), "int4")
    linears = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 4 * model.config.num_layers
    assert not any(isinstance(m, torch.nn.Linear) for m in q.layers.modules())
    assert torch.equal(q.embedding.weight, model.embedding.weight)
    # 4-bit codes + fp16 scale and uint8 zero per 128 weights: 4.19 bits of 32 (fp32) per weight
    ratio = quantize.model_bytes(q, exclude_embeddings=True) / quantize.model_bytes(model, exclude_embeddings=True)
    assert ratio < 0.14
    int8 = quantize.quantize_model(copy.deepcopy(model), "int8")
    assert quantize.model_bytes(int8, exclude_embeddings=True) / quantize.model_bytes(model, exclude_embeddings=True) \
        < 0.26


def test_save_and_load_quantized(trained, tmp_path):
    model, train, _, root = trained
    loaded = loading.load_model(str(root / "ckpt"), device="cpu")
    quantize.quantize_model(loaded.model, "gptq-int4", _calibration(train), act_order=True)
    settings = {"method": "gptq-int4", "group_size": 128, "symmetric": False, "act_order": True}
    loading.save_quantized(str(tmp_path / "q"), loaded.model, loaded.config, settings, loaded.vocab_size,
                           os.path.join(loaded.path, "tokenizer"))
    again = loading.load_model(str(tmp_path / "q"), device="cpu")
    tokens = torch.tensor([train[:40].tolist()])
    with torch.no_grad():
        assert torch.equal(again.model(tokens), loaded.model(tokens))
    assert again.tokenizer.encode("def main():") == loaded.tokenizer.encode("def main():")


def test_moe_experts_are_quantized_within_the_same_margins(trained_moe, tmp_path):
    """The routed experts (most of an MoE model's weights) are quantized, per expert, the router is
    not; perplexity stays within the dense model's margins; GPTQ calibrates every expert on its
    rows and is no worse than rounding; a saved quantized MoE model loads with identical outputs."""
    from megalm.inference.quantize import QuantizedExperts
    from megalm.model.moe import TopKRouter
    model, train, valid, _ = trained_moe
    base = _ppl(model, valid)
    assert base < 80
    calibration = _calibration(train)
    quantized = {}
    for method, margin in {"int8": 0.005, "int4": 0.03, "gptq-int4": 0.03}.items():
        q = quantized[method] = quantize.quantize_model(copy.deepcopy(model), method, calibration)
        assert abs(_ppl(q, valid) / base - 1) <= margin, method
    q = quantized["int4"]
    assert len([m for m in q.modules() if isinstance(m, QuantizedExperts)]) == model.config.num_layers
    assert all(r.weight.dtype == torch.float32 for r in q.modules() if isinstance(r, TopKRouter))
    ratio = quantize.model_bytes(q, exclude_embeddings=True) / quantize.model_bytes(model, exclude_embeddings=True)
    assert ratio < 0.15  # 4.19 bits per weight of 32, the routers (fp32) aside
    tokens = [t for c in calibration for t in c[0].tolist()]
    nll = lambda m: sum(evaluate.stream_nll(m, tokens[i:i + SEQ], SEQ, SEQ - 1, 512, progress=False)[0]  # noqa: E731
                        for i in range(0, len(tokens), SEQ))
    assert nll(quantized["gptq-int4"]) <= nll(q)
    config = Config(model=model.config)
    loading.save_quantized(str(tmp_path / "q"), quantized["gptq-int4"], config,
                           {"method": "gptq-int4", "group_size": 128, "symmetric": False, "act_order": False}, 512)
    again = loading.load_quantized(str(tmp_path / "q")).model
    x = torch.tensor([train[:40].tolist()])
    with torch.no_grad():
        assert torch.equal(again(x), quantized["gptq-int4"](x))


def test_saved_quantized_files_follow_the_umask(tmp_path):
    """safetensors creates its files 0600; a quantized model shared with a team must be readable."""
    config = Config(model=ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=2, seq_length=16,
                                      padded_vocab_size=128))
    model = quantize.quantize_model(GPTModel(config.model).eval(), "int8")
    settings = {"method": "int8", "group_size": 128, "symmetric": False, "act_order": False}
    old = os.umask(0o022)
    try:
        loading.save_quantized(str(tmp_path / "q"), model, config, settings, 128)
    finally:
        os.umask(old)
    for name in ("model.safetensors", loading.QUANTIZATION_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / "q" / name).st_mode) == 0o644, name


def test_quantization_math_does_not_import_loading():
    """Loading imports quantize (to rebuild a saved model's layers), never the other way round,
    and neither hides an import of the other in a function body."""
    def inference_imports(module):
        tree = ast.parse(open(module.__file__).read())
        found = [(n.module, n.col_offset) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        return [(name, col) for name, col in found if name and name.startswith("megalm.inference")]
    assert inference_imports(quantize) == []
    assert inference_imports(loading) == [("megalm.inference", 0)]


def _cli(tool, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_quantize_evaluate_save_and_generate(trained, tmp_path):
    _, _, _, root = trained
    out = str(tmp_path / "gptq")
    r = _cli("evaluate.py", "--load", str(root / "ckpt"), "--task", "perplexity", "--input", str(root / "valid.txt"),
             "--quantize", "gptq-int4", "--calibration-input", str(root / "train.txt"), "--calibration-samples", "16",
             "--save-quantized", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    q = result["quantization"]
    assert q["method"] == "gptq-int4" and q["saved"] == out
    assert abs(result["perplexity"] / q["perplexity_unquantized"] - 1) <= 0.03
    assert q["layer_bytes"] < 0.14 * q["layer_bytes_unquantized"]
    r = _cli("evaluate.py", "--load", out, "--task", "perplexity", "--input", str(root / "valid.txt"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    r = _cli("generate.py", "--load", out, "--prompt", "def parse_args(", "--max-new-tokens", "10", "--greedy")
    assert r.returncode == 0 and r.stdout.startswith("def parse_args("), r.stderr
