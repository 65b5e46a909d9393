"""LoRA adapters <-> Hugging Face peft: megalm's adapters exported load with `PeftModel.from_pretrained`
and give megalm's logits; peft's adapters imported give peft's logits; tools/lora.py merge; errors.

Models are tiny random transformers (tests/test_convert.py helpers) imported into megalm; the
adapters get random B (peft and megalm start B at zero, which would hide any misplaced tensor).
Tolerance: fp32 logits within 1e-5 absolute (the same products summed in another order).
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megalm.checkpoint import checkpoint_config, open_checkpoint, save_checkpoint
from megalm.convert import ConversionError, hf_to_megalm, megalm_to_hf
from megalm.convert.peft import megalm_to_peft, peft_to_megalm
from megalm.model import GPTModel
from megalm.posttrain import lora

transformers = pytest.importorskip("transformers", reason="peft conversion tests compare with transformers")
peft = pytest.importorskip("peft", reason="peft conversion tests load the adapters with peft")

from test_convert import VOCAB, hf_model, quiet, save_hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "llama3-gqa": dict(lora_target_modules=["all-linear"]),
    "qwen2": dict(lora_target_modules=["q_proj", "v_proj"], use_rslora=True),
    "mistral": dict(lora_target_modules=["k_proj", "o_proj", "up_proj", "down_proj"], lora_dropout=0.1),
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def randomize(tensors, seed: int = 1, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=generator) * std)


def load_lora(path: str) -> GPTModel:
    found, config = lora.open_lora_checkpoint(path)
    model = lora.lora_model(config).eval()
    model.load_state_dict(found["model"], strict=True)
    return model


def hf_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def megalm_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[..., :VOCAB]


@pytest.fixture(scope="module", params=list(SETTINGS))
def exported(request, tmp_path_factory):
    """(arch, HF dir, base checkpoint, LoRA checkpoint, its model, adapter dir)."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    hf_dir = save_hf(hf_model(arch), str(tmp / "hf"))
    base = hf_to_megalm(hf_dir, str(tmp / "base"), **quiet())
    found = open_checkpoint(base)
    config = checkpoint_config(found)
    config = dataclasses.replace(config, posttrain=dataclasses.replace(
        config.posttrain, lora_rank=4, lora_alpha=8.0, **SETTINGS[arch]))
    model = lora.lora_model(config).eval()
    assert lora.load_weights(model, found["model"])  # the adapters are new
    randomize(p for n, p in model.named_parameters() if n.endswith(".B"))
    save_checkpoint(str(tmp / "lora"), 7, model, config, extra_metadata={"hf": found["metadata"]["hf"]})
    adapter = megalm_to_peft(str(tmp / "lora"), str(tmp / "adapter"), base_model_name_or_path=hf_dir, **quiet())
    return arch, hf_dir, base, str(tmp / "lora"), model, adapter


def test_exported_adapter_gives_megalm_logits_in_peft(exported):
    arch, hf_dir, _, _, model, adapter = exported
    settings = json.load(open(os.path.join(adapter, "adapter_config.json")))
    expected = SETTINGS[arch]
    assert settings["peft_type"] == "LORA" and settings["task_type"] == "CAUSAL_LM" and settings["r"] == 4
    assert settings["lora_alpha"] == 8.0 and settings["use_rslora"] == expected.get("use_rslora", False)
    assert settings["target_modules"] == sorted(lora.resolve_targets(expected["lora_target_modules"]))
    assert settings["base_model_name_or_path"] == hf_dir and settings["bias"] == "none"
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    x = tokens()
    expected_logits = megalm_logits(model, x)
    torch.testing.assert_close(hf_logits(peft_model, x), expected_logits, atol=1e-5, rtol=0)
    plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert not torch.allclose(hf_logits(plain, x), expected_logits, atol=1e-3)  # the adapters matter


def test_import_of_the_exported_adapter_is_the_same_model(exported, tmp_path):
    _, _, base, _, model, adapter = exported
    path = peft_to_megalm(adapter, base, str(tmp_path / "again"), **quiet())
    again = load_lora(path)
    assert lora.lora_state_dict(again).keys() == lora.lora_state_dict(model).keys()
    for name, tensor in lora.lora_state_dict(model).items():
        assert torch.equal(lora.lora_state_dict(again)[name], tensor), name
    x = tokens()
    assert torch.equal(megalm_logits(again, x), megalm_logits(model, x))


def test_merge_tool_writes_the_merged_model(exported, tmp_path):
    """tools/lora.py merge: a plain checkpoint with the unmerged model's logits, exportable to Hugging
    Face, where it equals peft's own merge_and_unload."""
    arch, hf_dir, _, lora_ckpt, model, adapter = exported
    merged_path = _tool("lora").merge(lora_ckpt, str(tmp_path / "merged"))
    found = open_checkpoint(merged_path)
    config = checkpoint_config(found)
    assert config.posttrain.lora_rank == 0 and config.model == model.config
    merged = GPTModel(config.model).eval()
    merged.load_state_dict(found["model"], strict=True)
    x = tokens()
    torch.testing.assert_close(megalm_logits(merged, x), megalm_logits(model, x), atol=1e-5, rtol=0)
    exported_hf = megalm_to_hf(merged_path, str(tmp_path / "merged_hf"), **quiet())
    ours = transformers.AutoModelForCausalLM.from_pretrained(exported_hf, dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    torch.testing.assert_close(hf_logits(ours, x), hf_logits(theirs, x), atol=1e-5, rtol=0)


def test_adapter_trained_by_peft_imports_with_its_logits(tmp_path):
    """An adapter peft wrote itself (all seven projections of a grouped-query Llama)."""
    hf = hf_model("llama3-gqa")
    hf_dir = save_hf(hf, str(tmp_path / "hf"))
    base = hf_to_megalm(hf_dir, str(tmp_path / "base"), **quiet())
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config).eval()
    randomize((p for n, p in peft_model.named_parameters() if "lora_B" in n), std=0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    path = peft_to_megalm(str(tmp_path / "adapter"), base, str(tmp_path / "lora"), **quiet())
    model = load_lora(path)
    assert len(lora.adapted_linears(model)) == 4 * 2
    x = tokens()
    torch.testing.assert_close(megalm_logits(model, x), hf_logits(peft_model, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- errors

def _peft_adapter(hf, directory, **settings) -> str:
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, task_type="CAUSAL_LM", **settings))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_base")
    hf_dir = save_hf(hf_model("llama"), str(tmp / "hf"))
    return hf_to_megalm(hf_dir, str(tmp / "base"), **quiet())


def test_adapter_of_another_size_names_the_tensor_and_shapes(llama_base, tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    adapter = _peft_adapter(transformers.LlamaForCausalLM(config), str(tmp_path / "adapter"),
                            target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConversionError, match=r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                                              r"lora_A\.weight has shape \(4, 32\), the base model .* needs \(4, 64\): "
                                              r"the adapter was made for another base model"):
        peft_to_megalm(adapter, llama_base, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_adapter_of_another_architecture_is_refused(llama_base, tmp_path):
    adapter = _peft_adapter(hf_model("gpt2"), str(tmp_path / "adapter"), target_modules=["c_attn"])
    with pytest.raises(ConversionError, match="the adapter targets c_attn, modules of another architecture; megalm "
                                              "imports adapters of Llama, Mistral and Qwen2 models"):
        peft_to_megalm(adapter, llama_base, str(tmp_path / "out"))
    settings_path = os.path.join(adapter, "adapter_config.json")
    settings = json.load(open(settings_path))
    json.dump(dict(settings, peft_type="IA3"), open(settings_path, "w"))
    with pytest.raises(ConversionError, match="peft_type 'IA3'; megalm imports LORA adapters"):
        peft_to_megalm(adapter, llama_base, str(tmp_path / "out"))


def test_dora_and_more_layers_than_the_base_are_refused(llama_base, tmp_path):
    hf = hf_model("llama")
    dora = _peft_adapter(hf, str(tmp_path / "dora"), target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ConversionError, match="use_dora = True is not supported"):
        peft_to_megalm(dora, llama_base, str(tmp_path / "out"))
    deeper = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4))
    adapter = _peft_adapter(deeper, str(tmp_path / "deeper"), target_modules=["q_proj"])
    with pytest.raises(ConversionError, match=r"layers\.2\.self_attn\.q_proj\.lora_A\.weight has no place in the base "
                                              r"model .* \(2 layers\)"):
        peft_to_megalm(adapter, llama_base, str(tmp_path / "out"))


def test_export_needs_a_llama_family_lora_checkpoint(llama_base, tmp_path):
    with pytest.raises(Exception, match="holds no LoRA adapters .*--lora-rank 0"):
        megalm_to_peft(llama_base, str(tmp_path / "adapter"))
    gpt2 = hf_to_megalm(save_hf(hf_model("gpt2"), str(tmp_path / "gpt2_hf")), str(tmp_path / "gpt2"), **quiet())
    found = open_checkpoint(gpt2)
    config = checkpoint_config(found)
    config.posttrain.lora_rank = 2
    model = lora.lora_model(config)
    model.load_state_dict(found["model"], strict=False)
    save_checkpoint(str(tmp_path / "gpt2_lora"), 0, model, config, extra_metadata={"hf": found["metadata"]["hf"]})
    with pytest.raises(ConversionError, match="is a GPT2LMHeadModel model; peft adapters are converted for llama, "
                                              "mistral, qwen2 models"):
        megalm_to_peft(str(tmp_path / "gpt2_lora"), str(tmp_path / "adapter"))


def _cli(tool, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args], capture_output=True, text=True,
                          cwd=REPO)


def test_command_lines_print_one_error_line(exported, llama_base, tmp_path):
    _, _, base, lora_ckpt, _, adapter = exported
    result = _cli("convert_checkpoint.py", "--loader", "peft", "--saver", "megalm", "--load-dir", adapter,
                  "--save-dir", str(tmp_path / "x"))
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --loader peft needs --base-dir: the megalm checkpoint of the adapter's base model")
    result = _cli("convert_checkpoint.py", "--loader", "peft", "--saver", "megalm", "--load-dir", adapter,
                  "--base-dir", lora_ckpt, "--save-dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "holds LoRA adapters already" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "x")
    result = _cli("convert_checkpoint.py", "--loader", "peft", "--saver", "megalm", "--load-dir", adapter,
                  "--base-dir", base, "--save-dir", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr
    result = _cli("lora.py", "merge", "--load", llama_base, "--save", str(tmp_path / "merged"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "holds no LoRA adapters" in result.stderr
    result = _cli("lora.py", "merge", "--load", lora_ckpt, "--save", str(tmp_path / "x"))
    assert result.returncode == 2 and "exists; choose another or pass --force" in result.stderr
