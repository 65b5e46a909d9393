"""LoRA / QLoRA adapters on megalm's layers: the branch each target adds, merge, rsLoRA, QLoRA's
quantized base, what trains, checkpoints, errors, and tensor / pipeline / data parallelism.

Tolerances: merged vs unmerged and parallel vs single process are fp32 reorderings (atol 1e-5 on
logits, relative 2e-5 on the loss and 1e-4 on the gradient norm, as tests/test_parallel_equivalence.py).
QLoRA's logits against the unquantized LoRA model of the same weights: relative RMS error below
1% for int8 and below 20% for int4 (groups of up to 128 input features) on a tiny random model:
Gaussian weights are int4's worst case (16 levels over the group's range, about 10% error per linear,
compounding over the layers); a trained model's weights fare better.

Under torchrun this file is a worker: it trains each layout it is given and rank 0 writes the curves.
"""

import copy
import io
import math
import os

import pytest
import torch

from megalm.config import ModelConfig, PostTrainConfig
from megalm.model import GPTModel
from megalm.posttrain import lora
from tests.helpers import launch_workers, record_curves, worker_main

LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             seq_length=16, padded_vocab_size=128, swiglu=True, position_embedding_type="rope",
             normalization="RMSNorm", add_bias_linear=False, untie_embeddings_and_output_weights=True,
             hidden_dropout=0.0, attention_dropout=0.0)


def llama(seed: int = 0, **changes) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(ModelConfig(**dict(LLAMA, **changes))).eval()


def lora_config(**changes) -> PostTrainConfig:
    return PostTrainConfig(**dict(dict(lora_rank=4, lora_alpha=8.0, lora_target_modules=["all-linear"]), **changes))


def randomize_B(model, seed: int = 1, std: float = 0.2) -> None:
    """B starts at zero; a random B makes every adapter change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, linear in lora.adapted_linears(model):
            for adapter in linear.lora.values():
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * std)


def tokens(seed: int = 0, b: int = 2, s: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- the branch

def test_new_adapters_start_from_the_base_model_with_peft_init():
    base = llama()
    model = copy.deepcopy(base)
    names = lora.apply_lora(model, lora_config())
    assert len(names) == 4 * LLAMA["num_layers"]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    for _, linear in lora.adapted_linears(model):
        for adapter in linear.lora.values():
            bound = 1 / math.sqrt(adapter.A.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, in]
            assert adapter.A.abs().max() <= bound and adapter.A.abs().max() > 0.5 * bound
            assert not adapter.B.any()


def test_default_targets_are_q_and_v_like_peft():
    model = llama()
    names = lora.apply_lora(model, PostTrainConfig(lora_rank=2))
    assert names == ["layers.0.self_attention.linear_qkv", "layers.1.self_attention.linear_qkv"]
    assert list(model.layers[0].self_attention.linear_qkv.lora) == ["q_proj", "v_proj"]


def _fused_delta(model, linear_name: str, x: torch.Tensor) -> torch.Tensor:
    """The LoRA part of one linear's output for the input x: adapted minus base."""
    linear = model.get_submodule(linear_name)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, linear.weight)
        return linear(x) - base


@pytest.mark.parametrize("target, rows", [("q_proj", slice(0, 2)), ("k_proj", slice(2, 3)), ("v_proj", slice(3, 4))])
def test_a_qkv_target_writes_only_its_rows_of_the_grouped_layout(target, rows):
    """[g0: q0 q1 k v | g1: q2 q3 k v] (4 heads, 2 groups): q_proj changes only the q rows of each group."""
    model = llama()
    lora.apply_lora(model, lora_config(lora_target_modules=[target]))
    randomize_B(model)
    delta = _fused_delta(model, "layers.0.self_attention.linear_qkv", torch.randn(3, 64))
    grouped = delta.view(3, 2, 4, 16)  # [t, groups, q q k v, head_dim]
    inside = torch.zeros(4, dtype=torch.bool)
    inside[rows] = True
    assert grouped[:, :, inside].abs().min() > 0 or grouped[:, :, inside].abs().mean() > 1e-3
    assert not grouped[:, :, ~inside].any()


def test_gate_and_up_targets_write_their_half_of_fc1():
    model = llama()
    lora.apply_lora(model, lora_config(lora_target_modules=["up_proj"]))
    randomize_B(model)
    delta = _fused_delta(model, "layers.1.mlp.linear_fc1", torch.randn(3, 64))
    assert not delta[:, :96].any() and delta[:, 96:].abs().mean() > 1e-3


def test_merged_model_equals_the_unmerged_one():
    model = llama()
    lora.apply_lora(model, lora_config())
    randomize_B(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        merged = lora.merge_lora(copy.deepcopy(model))
        assert not lora.adapted_linears(merged) and not lora.lora_state_dict(merged)
        assert set(merged.state_dict()) == set(llama().state_dict())
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)
        assert not torch.equal(expected, llama()(x))
    assert merged.layers[0].self_attention.linear_qkv.weight.partition_dim == 0


def test_rslora_scales_by_alpha_over_sqrt_rank():
    x = torch.randn(3, 64)
    deltas = {}
    for rslora in (False, True):
        model = llama()
        lora.apply_lora(model, lora_config(lora_rank=16, lora_alpha=8.0, use_rslora=rslora,
                                           lora_target_modules=["o_proj"]))
        randomize_B(model)
        deltas[rslora] = _fused_delta(model, "layers.0.self_attention.linear_proj", x)
        assert model.layers[0].self_attention.linear_proj.lora_scaling == (8.0 / 4 if rslora else 8.0 / 16)
    torch.testing.assert_close(deltas[True], 4 * deltas[False])


def test_dropout_acts_on_the_adapter_branch_in_training_only():
    model = llama()
    lora.apply_lora(model, lora_config(lora_dropout=0.5))
    randomize_B(model)
    x = tokens()
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        trained = model(x)
        model.eval()
        no_branch = copy.deepcopy(model)
        for _, linear in lora.adapted_linears(no_branch):
            linear.lora_scaling = 0.0
        assert not torch.allclose(trained, evaluated)
        torch.testing.assert_close(model(x), evaluated)
        assert not torch.allclose(no_branch(x), evaluated)


# ---------------------------------------------------------------------------------------- training

def test_only_the_adapters_get_gradients_and_optimizer_state():
    from megalm.config import OptimConfig
    from megalm.parallel.data_parallel import DistributedDataParallel
    from megalm.parallel.distributed_optimizer import DistributedOptimizer, LocalOptimizer
    from megalm.parallel.state import ParallelState
    from megalm.training.optimizer import build_optimizer

    model = llama().train()
    lora.apply_lora(model, lora_config())
    randomize_B(model)
    adapters = {name for name, p in model.named_parameters() if lora.is_adapter(name)}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == adapters
    ddp = DistributedDataParallel(model, ParallelState())
    assert {id(p) for b in ddp.buckets for p in b.params} == {id(p) for p in lora.trainable_parameters(model)}
    optimizer = LocalOptimizer([model], lambda params: build_optimizer(params, OptimConfig(), torch.device("cpu")),
                               ParallelState())
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in optimizer.params} == adapters
    ddp.zero_grad_buffer()
    x = tokens()
    model(x, x).backward()
    ddp.finish_grad_sync()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    assert set(optimizer.state_dict()["state"]) == adapters
    ddp.close()
    sharded = DistributedDataParallel(model, ParallelState(), use_distributed_optimizer=True)
    zero = DistributedOptimizer([sharded], lambda params: build_optimizer(params, OptimConfig(), torch.device("cpu")),
                                ParallelState())
    assert {names[id(p)] for _, p, *_ in zero.pieces} == adapters
    sharded.close()


def test_counts_and_log_line():
    model = llama()
    total = sum(p.numel() for p in model.parameters())
    lora.apply_lora(model, lora_config())
    trainable, counted = lora.parameter_counts(model)
    r, h, ffn = 4, 64, 96
    per_layer = r * (h + 64) + 2 * r * (h + 32) + r * (h + h) + 2 * r * (h + ffn) + r * (ffn + h)  # q, k v, o, gate up, down
    assert trainable == 2 * per_layer and counted == total + trainable
    assert lora.base_weight_bytes(model) == 4 * total
    line = lora.describe(model, lora_config())
    assert "rank 4" in line and f"trainable {trainable:,} of {counted:,}" in line and "8 linears" in line


# ---------------------------------------------------------------------------------------- QLoRA

@pytest.mark.parametrize("method, margin", [("int8", 0.01), ("int4", 0.2)])
def test_qlora_is_close_to_lora_and_trains_only_the_adapters(method, margin):
    full = llama()
    lora.apply_lora(full, lora_config())
    randomize_B(full)
    quantized = llama()
    lora.apply_lora(quantized, lora_config(lora_base_quantization=method))
    quantized.load_state_dict(full.state_dict())  # the base weights are quantized as they load
    x = tokens()
    with torch.no_grad():
        expected, got = full(x), quantized(x)
    assert (got - expected).norm() / expected.norm() < margin
    assert not torch.equal(got, expected)
    linear = quantized.layers[0].self_attention.linear_qkv
    assert "weight" not in dict(linear.named_parameters(recurse=False))
    assert linear.weight_quantized.qweight.dtype == (torch.int8 if method == "int8" else torch.uint8)
    adapted = sum(m.weight_quantized.in_features * m.weight_quantized.out_features
                  for _, m in lora.adapted_linears(quantized))
    saved = 4 * adapted - (lora.base_weight_bytes(quantized) - (lora.base_weight_bytes(full) - 4 * adapted))
    assert saved > (0.7 if method == "int8" else 0.8) * 4 * adapted
    quantized.train()
    quantized(x, x).backward()
    assert {n for n, p in quantized.named_parameters() if p.grad is not None} == \
        {n for n, _ in quantized.named_parameters() if lora.is_adapter(n)}


def test_qlora_state_dict_holds_plain_weights_and_merges():
    model = llama()
    lora.apply_lora(model, lora_config(lora_base_quantization="int4"))
    randomize_B(model)
    state = model.state_dict()
    assert set(state) == set(llama().state_dict()) | set(lora.lora_state_dict(model))
    linear = model.layers[0].mlp.linear_fc2
    torch.testing.assert_close(state["layers.0.mlp.linear_fc2.weight"], linear.weight_quantized.dequantize())
    again = llama(seed=5)
    lora.apply_lora(again, lora_config(lora_base_quantization="int4"))
    again.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        step = linear.weight_quantized.scales.float().max()
        assert (again.state_dict()["layers.0.mlp.linear_fc2.weight"] - state["layers.0.mlp.linear_fc2.weight"]).abs().max() <= step
        expected = model(x)
        torch.testing.assert_close(lora.merge_lora(model)(x), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- checkpoints

def test_base_checkpoint_loads_into_a_lora_model_and_adapters_round_trip(tmp_path):
    from megalm.checkpoint import read_checkpoint, save_checkpoint
    from megalm.config import Config

    base = llama()
    config = Config(model=base.config)
    save_checkpoint(str(tmp_path / "base"), 0, base, config)
    model = llama(seed=3)
    lora.apply_lora(model, lora_config())
    found = read_checkpoint(str(tmp_path / "base" / "iter_0000000"))
    missing = lora.load_weights(model, found["model"])
    assert missing == sorted(lora.lora_state_dict(model)) or set(missing) == set(lora.lora_state_dict(model))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    randomize_B(model)
    save_checkpoint(str(tmp_path / "lora"), 0, model, config)
    again = llama(seed=4)
    lora.apply_lora(again, lora_config())
    assert lora.load_weights(again, read_checkpoint(str(tmp_path / "lora" / "iter_0000000"))["model"]) == []
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    wrong = dict(found["model"])
    wrong.pop("final_layernorm.weight")
    with pytest.raises(ValueError, match="missing \\['final_layernorm.weight'\\]"):
        lora.load_weights(again, wrong)


def test_training_resumes_on_the_same_loss_curve(tmp_path):
    """Frozen base + adapters through the real loop: DDP buckets, optimizer state by name, checkpoint, resume."""
    from helpers import tiny_config

    import pretrain_gpt
    from megalm.training.trainer import Trainer

    flags = ["--swiglu", "--num-query-groups", "2", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
             "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--global-batch-size", "4",
             "--micro-batch-size", "2", "--lr", "1e-2", "--save", str(tmp_path / "ckpt"), "--save-interval", "2"]

    def lora_run(*extra):
        config = tiny_config(*flags, *extra)
        config.posttrain = lora_config()
        trainer = Trainer(config, lora_provider, pretrain_gpt.datasets_provider, log_stream=io.StringIO())
        try:
            return trainer.train()
        finally:
            trainer.close()

    full = lora_run("--train-iters", "4")
    import shutil
    shutil.rmtree(tmp_path / "ckpt" / "iter_0000004")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = lora_run("--train-iters", "4", "--load", str(tmp_path / "ckpt"))
    assert [loss for _, loss in resumed.history] == pytest.approx([loss for _, loss in full.history][2:], rel=1e-6)
    assert full.history[-1][1] < full.history[0][1]


def test_lora_checkpoints_reshard_with_their_adapters(tmp_path):
    """TP=1 -> TP=2 x PP=2 -> TP=1: the adapters split like their base linears and come back unchanged."""
    from megalm.checkpoint import read_checkpoint, save_checkpoint
    from megalm.config import Config
    from megalm.convert.reshard import reshard

    model = llama()
    config = Config(model=model.config, posttrain=lora_config(lora_target_modules=["q_proj", "down_proj"]))
    lora.apply_lora(model, config.posttrain)
    randomize_B(model)
    save_checkpoint(str(tmp_path / "tp1"), 3, model, config)
    quiet = dict(log=lambda *a: None)
    reshard(str(tmp_path / "tp1"), str(tmp_path / "tp2pp2"), target_tp=2, target_pp=2, **quiet)
    shard = read_checkpoint(str(tmp_path / "tp2pp2" / "iter_0000003"), model_parallel_rank=(1, 0))["model"]
    q_B = model.state_dict()["layers.0.self_attention.linear_qkv.lora.q_proj.B"]
    assert torch.equal(shard["layers.0.self_attention.linear_qkv.lora.q_proj.B"], q_B[32:])  # rank 1's group
    down_A = model.state_dict()["layers.0.mlp.linear_fc2.lora.down_proj.A"]
    assert torch.equal(shard["layers.0.mlp.linear_fc2.lora.down_proj.A"], down_A[:, 48:])
    reshard(str(tmp_path / "tp2pp2"), str(tmp_path / "back"), **quiet)
    back = read_checkpoint(str(tmp_path / "back" / "iter_0000003"))["model"]
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def lora_provider(config, parallel=None, virtual_stage: int = 0):
    model = GPTModel(config.model, parallel, virtual_stage)
    lora.apply_lora(model, config.posttrain, parallel)
    return model


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("changes, message", [
    (dict(lora_rank=-1), "--lora-rank must not be negative, got -1"),
    (dict(lora_rank=0), "--lora-rank is 0"),
    (dict(lora_target_modules=["q_proj", "qkv"]), "unknown LoRA target module\\(s\\) qkv: megalm adapts the linears "
                                                   "named q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"),
    (dict(lora_target_modules=[]), "--lora-target-modules is empty"),
    (dict(lora_base_quantization="nf4"), "--lora-base-quantization 'nf4': choose one of int8, int4"),
])
def test_bad_settings_are_refused_with_the_flag_named(changes, message):
    with pytest.raises(ValueError, match=message):
        lora.apply_lora(llama(), lora_config(**changes))


def test_adapters_are_not_stacked():
    model = llama()
    lora.apply_lora(model, lora_config())
    with pytest.raises(ValueError, match="the model has LoRA adapters already: merge them"):
        lora.apply_lora(model, lora_config())


def test_gelu_models_have_no_gate_proj():
    model = llama(swiglu=False, normalization="LayerNorm", position_embedding_type="learned_absolute")
    with pytest.raises(ValueError, match="no linear of this model matches --lora-target-modules gate_proj"):
        lora.apply_lora(model, lora_config(lora_target_modules=["gate_proj"]))
    assert lora.apply_lora(model, lora_config(lora_target_modules=["up_proj"])) == \
        ["layers.0.mlp.linear_fc1", "layers.1.mlp.linear_fc1"]


def test_moe_routed_experts_stay_without_adapters():
    model = llama(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32)
    names = lora.apply_lora(model, lora_config())
    assert "layers.0.mlp.shared_experts.linear_fc1" in names and not any(".experts." in n for n in names)
    assert not any(p.requires_grad for p in model.layers[0].mlp.experts.parameters())


# ---------------------------------------------------------------------------------------- parallel

TRAIN = ["--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--attention-dropout", "0", "--hidden-dropout", "0", "--log-interval", "1",
         "--eval-iters", "0", "--train-iters", "5", "--global-batch-size", "8", "--micro-batch-size", "2",
         "--lr", "1e-2", "--seed", "3", "--swiglu", "--num-query-groups", "2", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2_distributed_optimizer": ["--use-distributed-optimizer"],
}


def train_lora(flags: list) -> dict:
    """Train a LoRA model in this process (under torchrun: in its process group): per-step loss and
    gradient norm, and whether the optimizer held adapter pieces only."""
    import pretrain_gpt
    from megalm.arguments import parse_args

    def only_adapters(trainer) -> dict:
        names = {id(p): n for chunk in trainer.chunks for n, p in chunk.named_parameters()}
        optimizer = trainer.optimizer
        held = [p for p in optimizer.params] if hasattr(optimizer, "params") else [p for _, p, *_ in optimizer.pieces]
        return {"only_adapters": bool(held) and all(lora.is_adapter(names[id(p)]) for p in held)}

    config, _ = parse_args(flags)
    config.posttrain = lora_config(lora_rank=4, lora_alpha=16.0)
    pretrain_gpt.set_vocabulary(config)
    return record_curves(config, lora_provider, before=only_adapters)


@pytest.mark.slow
def test_tensor_pipeline_and_data_parallel_lora_match_one_process(tmp_path):
    """Same loss and gradient norm; the checkpoints of TP=2 and PP=2 merge into the single process's
    (frozen base bit for bit, adapters within 1e-4 in norm) and export to peft."""
    reference = train_lora(TRAIN + ["--save", str(tmp_path / "reference")])
    assert reference["only_adapters"]
    saved = {"tp2": str(tmp_path / "tp2"), "pp2": str(tmp_path / "pp2")}
    runs = {name: TRAIN + flags + (["--save", saved[name]] if name in saved else []) for name, flags in LAYOUTS.items()}
    curves = launch_workers(os.path.abspath(__file__), 2, runs, str(tmp_path / "curves.json"), timeout=600)
    for name in LAYOUTS:
        assert curves[name]["only_adapters"], name
        assert len(curves[name]["loss"]) == 5, name
        for key, rtol in (("loss", 2e-5), ("grad_norm", 1e-4)):
            assert curves[name][key] == pytest.approx(reference[key], rel=rtol), f"{name}: {key}"
    assert reference["loss"][-1] < reference["loss"][0]
    expected, _ = lora.open_lora_checkpoint(str(tmp_path / "reference"))
    for name, path in saved.items():
        found, config = lora.open_lora_checkpoint(path)
        assert found["model"].keys() == expected["model"].keys(), name
        for key, tensor in expected["model"].items():
            if lora.is_adapter(key):
                # Adam turns the reordered sums of near-zero gradients into whole steps of a few
                # elements: the tensor as a whole agrees, a misplaced shard would not.
                assert (found["model"][key] - tensor).norm() < 1e-4 * tensor.norm(), f"{name}: {key}"
            else:
                assert torch.equal(found["model"][key], tensor), f"{name}: {key}"
        from megalm.convert.peft import megalm_to_peft
        adapter = megalm_to_peft(path, str(tmp_path / f"{name}_adapter"), log=lambda *a: None)
        from safetensors.torch import load_file
        assert len(load_file(os.path.join(adapter, "adapter_model.safetensors"))) == len(lora.lora_state_dict(
            lora.lora_model(config)))


if __name__ == "__main__":
    worker_main(train_lora)
