"""Hugging Face <-> megalm conversion: logits, round trips, files written, tokenizers, errors.

Models are built with random weights from the transformers config classes (tiny sizes, no
downloads). The helpers at the top are shared with the generation and evaluation tests.
"""

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from megalm.checkpoint import checkpoint_config, open_checkpoint
from megalm.convert import ConversionError, hf_to_megalm, megalm_to_hf
from megalm.model import GPTModel

transformers = pytest.importorskip("transformers", reason="conversion tests compare with transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 100  # not a multiple of 128: the megalm side pads to 128

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3-gqa": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                        tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}


def hf_model(arch: str, seed: int = 0, init_std: float = 0.1, vocab_size: int = VOCAB):
    """A tiny random `transformers` model of the family; init_std larger than the usual 0.02 so that
    the next-token distribution is far from uniform (greedy choices without near ties)."""
    config_class, model_class, extra = ARCHS[arch]
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=1, initializer_range=init_std,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    else:
        config = getattr(transformers, config_class)(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, initializer_range=init_std, bos_token_id=0, eos_token_id=1, **extra)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random (not zero / one) biases and norm weights, so that they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kwargs)
    return path


def load_megalm(path):
    """GPTModel (eval, fp32) of a megalm checkpoint."""
    found = open_checkpoint(path)
    model = GPTModel(checkpoint_config(found).model).eval()
    model.load_state_dict(found["model"])
    return model


def write_tokenizer(directory, vocab_size: int = 300, text_source=None):
    """A byte-level BPE tokenizer.json with `vocab_size` tokens (<|endoftext|> included), trained on a
    stdlib source file, plus the tokenizer_config.json transformers expects next to it."""
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(text_source or textwrap.__file__, encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text], trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, f)
    return tok.get_vocab_size()


def quiet(**kwargs):
    return dict(log=lambda *a: None, **kwargs)


@pytest.fixture(scope="module", params=list(ARCHS))
def converted(request, tmp_path_factory):
    """(arch, HF model, HF dir, megalm checkpoint dir) for each family."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = hf_model(arch)
    hf_dir = save_hf(model, str(root / "hf"))
    ckpt = str(root / "megalm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_to_megalm(hf_dir, ckpt, **quiet())
    return arch, model, hf_dir, ckpt


def test_logits_match_transformers(converted):
    arch, hf, _, ckpt = converted
    model = load_megalm(ckpt)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert got.shape[-1] == 128  # padded vocabulary
    assert (got[..., :VOCAB] - expected).abs().max().item() <= 1e-4


def test_megalm_hf_megalm_is_bitwise_identical(converted, tmp_path):
    arch, _, _, ckpt = converted
    megalm_to_hf(ckpt, str(tmp_path / "hf"), **quiet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_to_megalm(str(tmp_path / "hf"), str(tmp_path / "back"), **quiet())
    before, after = open_checkpoint(ckpt)["model"], open_checkpoint(str(tmp_path / "back"))["model"]
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def test_export_loads_with_transformers_alone(converted, tmp_path):
    arch, hf, _, ckpt = converted
    out = str(tmp_path / "hf")
    megalm_to_hf(ckpt, out, **quiet())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    tokens = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == 1
    assert os.path.isfile(os.path.join(out, "generation_config.json"))


def test_exported_weights_follow_the_umask(tmp_path):
    """safetensors creates its files 0600; an export shared with a team must be readable by it."""
    ckpt = str(tmp_path / "megalm")
    hf_to_megalm(save_hf(hf_model("llama"), str(tmp_path / "hf")), ckpt, **quiet())
    old = os.umask(0o022)
    try:
        megalm_to_hf(ckpt, str(tmp_path / "out"), **quiet())
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name


def test_llama3_rope_scaling_survives_the_round_trip(tmp_path):
    ckpt = str(tmp_path / "megalm")
    hf_to_megalm(save_hf(hf_model("llama3-gqa"), str(tmp_path / "hf")), ckpt, **quiet())
    model_config = checkpoint_config(open_checkpoint(ckpt)).model
    assert (model_config.rope_scaling_factor, model_config.rotary_base, model_config.num_query_groups) == \
        (8.0, 500000.0, 2)
    assert not model_config.untie_embeddings_and_output_weights
    megalm_to_hf(ckpt, str(tmp_path / "out"), **quiet())
    scaling = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    params = getattr(scaling, "rope_parameters", None) or scaling.rope_scaling
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0


def test_sharded_safetensors_with_index(tmp_path):
    hf = hf_model("qwen2")
    hf_dir = save_hf(hf, str(tmp_path / "hf"), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    hf_to_megalm(hf_dir, str(tmp_path / "megalm"), **quiet())
    out = str(tmp_path / "out")
    megalm_to_hf(str(tmp_path / "megalm"), out, max_shard_size="20KB", **quiet())
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_tied_output_layer_is_written_once(tmp_path):
    hf_to_megalm(save_hf(hf_model("gpt2"), str(tmp_path / "hf")), str(tmp_path / "megalm"), **quiet())
    assert "output_layer.weight" not in open_checkpoint(str(tmp_path / "megalm"))["model"]
    megalm_to_hf(str(tmp_path / "megalm"), str(tmp_path / "out"), **quiet())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_tokenizer_files_travel_both_ways(tmp_path):
    hf_dir = save_hf(hf_model("llama", vocab_size=320), str(tmp_path / "hf"))
    write_tokenizer(hf_dir)  # 300 tokens: a smaller tokenizer than the embedding is fine (Qwen2 has one)
    path = hf_to_megalm(hf_dir, str(tmp_path / "megalm"), **quiet())
    config = checkpoint_config(open_checkpoint(str(tmp_path / "megalm")))
    assert config.data.tokenizer_type == "HuggingFaceTokenizer"
    assert config.data.tokenizer_model == os.path.abspath(os.path.join(path, "tokenizer"))
    assert sorted(os.listdir(os.path.join(path, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
    from megalm.data.tokenizer import build_tokenizer
    assert build_tokenizer(config.data).encode("def wrap(text):")  # the megalm side reads it

    out = str(tmp_path / "out")
    megalm_to_hf(str(tmp_path / "megalm"), out, **quiet())
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = build_tokenizer(config.data)
    text = "    def fill(self, text):\n        return '\\n'.join(self.wrap(text))"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_checkpoint_tokenizer_is_found_after_the_original_moves(tmp_path):
    from megalm.checkpoint import checkpoint_tokenizer, save_checkpoint
    from megalm.config import Config, DataConfig, ModelConfig
    tok_dir = str(tmp_path / "tok")
    write_tokenizer(tok_dir, vocab_size=300)
    config = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
                                      padded_vocab_size=384),
                    data=DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tok_dir))
    save_checkpoint(str(tmp_path / "ckpt"), 3, GPTModel(config.model), config)
    os.rename(tok_dir, str(tmp_path / "moved"))
    loaded = checkpoint_config(open_checkpoint(str(tmp_path / "ckpt")))
    assert isinstance(loaded, Config) and checkpoint_tokenizer(loaded).vocab_size == 300
    megalm_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), **quiet())  # a megalm-trained model exports
    assert json.load(open(tmp_path / "out" / "config.json"))["vocab_size"] == 300
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).eos_token == "<|endoftext|>"


# ---- errors ---------------------------------------------------------------------------------------

def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def _rewrite_weights(hf_dir, edit):
    from safetensors.torch import load_file, save_file
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def llama_dir(tmp_path):
    return save_hf(hf_model("llama"), str(tmp_path / "hf"))


def test_unsupported_architecture_lists_the_supported_ones(llama_dir, tmp_path):
    _edit_config(llama_dir, model_type="falcon", architectures=["FalconForCausalLM"])
    with pytest.raises(ConversionError, match=r"unsupported architecture FalconForCausalLM .*LlamaForCausalLM "
                                              r"\(llama\), MistralForCausalLM.*GPT2LMHeadModel"):
        hf_to_megalm(llama_dir, str(tmp_path / "out"), **quiet())


def test_missing_tensor_is_named(llama_dir, tmp_path):
    _rewrite_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        hf_to_megalm(llama_dir, str(tmp_path / "out"), **quiet())


def test_extra_tensor_is_named(llama_dir, tmp_path):
    _rewrite_weights(llama_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ConversionError, match="unexpected tensor model.layers.0.self_attn.q_norm.weight"):
        hf_to_megalm(llama_dir, str(tmp_path / "out"), **quiet())


def test_shape_mismatch_names_tensor_and_shapes(llama_dir, tmp_path):
    _edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(ConversionError, match=r"shape mismatch for model.layers.0.mlp.gate_proj.weight .*"
                                              r"\[96, 64\] in the file, \[128, 64\] expected"):
        hf_to_megalm(llama_dir, str(tmp_path / "out"), **quiet())


def test_tokenizer_larger_than_embedding_is_refused(llama_dir, tmp_path):
    write_tokenizer(llama_dir)
    with pytest.raises(ConversionError, match="tokenizer has 300 tokens but the model's embedding has 100 rows"):
        hf_to_megalm(llama_dir, str(tmp_path / "out"), **quiet())


def test_existing_output_needs_force(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="exists; choose another or pass --force"):
        hf_to_megalm(llama_dir, str(out), **quiet())
    hf_to_megalm(llama_dir, str(out), force=True, **quiet())
    with pytest.raises(ConversionError, match="exists; choose another or pass --force"):
        megalm_to_hf(str(out), llama_dir, **quiet())


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_round_trip_and_one_line_errors(llama_dir, tmp_path):
    ckpt, out = str(tmp_path / "megalm"), str(tmp_path / "hf_out")
    r = _cli("--loader", "hf", "--saver", "megalm", "--load-dir", llama_dir, "--save-dir", ckpt)
    assert r.returncode == 0, r.stderr
    r = _cli("--loader", "megalm", "--saver", "hf", "--load-dir", ckpt, "--save-dir", out)
    assert r.returncode == 0, r.stderr
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None

    r = _cli("--loader", "megalm", "--saver", "hf", "--load-dir", ckpt, "--save-dir", out)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: output directory {out} exists; choose another or pass --force to overwrite it"
    r = _cli("--loader", "megalm", "--saver", "hf", "--load-dir", ckpt, "--save-dir", str(tmp_path / "x"),
             "--target-tensor-parallel-size", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "describe a megalm output; a Hugging Face checkpoint is never sharded" in r.stderr
    _edit_config(llama_dir, model_type="falcon")
    r = _cli("--loader", "hf", "--saver", "megalm", "--load-dir", llama_dir, "--save-dir", str(tmp_path / "y"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "unsupported architecture" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tensor_and_pipeline_parallel_checkpoints_convert_both_ways(llama_dir, tmp_path):
    from megalm.convert.hf_files import load_tensors
    from megalm.convert.reshard import saved_layout
    sharded, merged, out = (str(tmp_path / n) for n in ("tp2_pp2", "tp1_pp1", "hf_again"))
    r = _cli("--loader", "hf", "--saver", "megalm", "--load-dir", llama_dir, "--save-dir", sharded,
             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    assert r.returncode == 0, r.stderr
    assert saved_layout(sharded) == (2, 2, 1)
    # Export merges the shards: the Hugging Face tensors come back exactly.
    r = _cli("--loader", "megalm", "--saver", "hf", "--load-dir", sharded, "--save-dir", out)
    assert r.returncode == 0, r.stderr
    original, again = load_tensors(llama_dir), load_tensors(out)
    assert set(original) == set(again)
    assert all(torch.equal(original[name], again[name]) for name in original)
    # megalm -> megalm reshards; the merged checkpoint loads for inference like any other.
    r = _cli("--loader", "megalm", "--saver", "megalm", "--load-dir", sharded, "--save-dir", merged)
    assert r.returncode == 0, r.stderr
    assert saved_layout(merged) == (1, 1, 1)
    a, b = load_megalm(sharded), load_megalm(merged)
    tokens = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)
