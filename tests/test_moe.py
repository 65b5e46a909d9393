"""The MoE layer and model: equivalences, losses, dropping, and configuration errors."""

import dataclasses
import json
import re

import pytest
import torch

from megalm import checkpoint as ckpt
from megalm.arguments import parse_args
from megalm.config import Config, ConfigError, ModelConfig
from megalm.model import GPTModel
from megalm.model.mlp import MLP
from megalm.model.moe import MoELayer, load_balancing_loss, z_loss
from megalm.training.metrics import moe_log, moe_statistics


def moe_config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, swiglu=True,
                add_bias_linear=False, ffn_hidden_size=48, num_experts=4, moe_router_topk=2,
                moe_ffn_hidden_size=24, padded_vocab_size=64, normalization="RMSNorm",
                position_embedding_type="rope", attention_dropout=0.0, hidden_dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def test_one_expert_top1_equals_the_dense_mlp():
    config = moe_config(num_experts=1, moe_router_topk=1, moe_ffn_hidden_size=48)
    torch.manual_seed(0)
    moe, mlp = MoELayer(config, 0), MLP(config)
    with torch.no_grad():
        moe.experts.weight1[0].copy_(mlp.linear_fc1.weight)
        moe.experts.weight2[0].copy_(mlp.linear_fc2.weight)
    x = torch.randn(2, 5, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, y_mlp = moe(x1), mlp(x2)
    torch.testing.assert_close(y_moe, y_mlp, atol=1e-6, rtol=1e-5)
    y_moe.square().sum().backward()
    y_mlp.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.weight1.grad[0], mlp.linear_fc1.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.weight2.grad[0], mlp.linear_fc2.weight.grad, atol=1e-5, rtol=1e-5)


def test_layer_equals_a_loop_over_experts():
    """Top-k routing with a shared expert against a direct per-token computation."""
    config = moe_config(moe_shared_expert_intermediate_size=16, moe_router_norm_topk_prob=True)
    torch.manual_seed(1)
    layer = MoELayer(config, 0).eval()
    x = torch.randn(7, 32)
    scores = torch.softmax(x @ layer.router.weight.t(), -1)
    top, idx = scores.topk(2)
    top = top / top.sum(-1, keepdim=True)
    want = layer.shared_experts(x)
    for t in range(7):
        for j in range(2):
            e = int(idx[t, j])
            gate, up = (layer.experts.weight1[e] @ x[t]).chunk(2)
            want[t] = want[t] + top[t, j] * (layer.experts.weight2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(layer(x[None])[0], want, atol=1e-5, rtol=1e-4)


def test_triton_path_matches_reference_path(monkeypatch):
    config = moe_config(moe_shared_expert_intermediate_size=16, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    torch.manual_seed(2)
    layer = MoELayer(config, 0)
    x = torch.randn(2, 9, 32)
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("MEGALM_KERNELS", backend)
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y = layer(xx)
        (y.square().sum() + layer.aux_loss).backward()
        results.append([y, xx.grad] + [p.grad.clone() for p in layer.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_uniform_router_has_aux_loss_one_and_known_z_loss():
    t, e = 8, 4
    scores = torch.full((t, e), 1 / e)
    indices = torch.tensor([[i % e, (i + 1) % e] for i in range(t)])
    assert load_balancing_loss(scores, indices, e, "softmax").item() == pytest.approx(1.0)
    assert z_loss(torch.zeros(t, e)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_aux_loss_pushes_a_skewed_router_toward_balance():
    config = moe_config(num_experts=8, moe_aux_loss_coeff=1.0)
    torch.manual_seed(3)
    layer = MoELayer(config, 0)
    x = torch.randn(256, 32)
    with torch.no_grad():  # every token prefers expert 0, then expert 1
        layer.router.weight[0] = x.mean(0) * 3
        layer.router.weight[1] = x.mean(0) * 2
    optimizer = torch.optim.SGD(layer.router.parameters(), lr=0.5)

    def load_cv():
        counts = torch.bincount(layer.router(x)[2].reshape(-1), minlength=8).float()
        return (counts.std(unbiased=False) / counts.mean()).item()

    before, aux_before = load_cv(), None
    for _ in range(20):
        optimizer.zero_grad()
        layer(x[None])
        aux_before = aux_before or layer.aux_loss.item()
        layer.aux_loss.backward()
        optimizer.step()
    assert layer.aux_loss.item() < aux_before
    assert load_cv() < 0.5 * before


def test_dropless_keeps_every_token_and_capacity_drops_the_overflow():
    torch.manual_seed(4)
    dropless = MoELayer(moe_config(num_experts=4, moe_router_topk=1), 0)
    capped = MoELayer(moe_config(num_experts=4, moe_router_topk=1, moe_expert_capacity_factor=1.0), 0)
    padded = MoELayer(moe_config(num_experts=4, moe_router_topk=1, moe_expert_capacity_factor=1.0,
                                 moe_pad_expert_input_to_capacity=True), 0)
    capped.load_state_dict(dropless.state_dict())
    padded.load_state_dict(dropless.state_dict())
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        dropless.router.weight[0] += x[0].mean(0) * 4  # expert 0 is over capacity (16 tokens)
        capped.router.weight.copy_(dropless.router.weight)
        padded.router.weight.copy_(dropless.router.weight)
    y_full, y_cap, y_pad = dropless(x)[0], capped(x)[0], padded(x)[0]
    stats = moe_statistics([dropless, capped, padded])
    assert stats["dropped"] > 0
    assert (y_full.abs().sum(-1) > 0).all()  # dropless: every token has its expert's output
    dropped = y_cap.abs().sum(-1) == 0  # a dropped token gets nothing (there is no shared expert)
    assert 0 < int(dropped.sum()) == stats["dropped"] / 2
    torch.testing.assert_close(y_cap[~dropped], y_full[~dropped])
    torch.testing.assert_close(y_pad, y_cap)
    assert "dropped" in moe_log(stats)[0]


def test_model_adds_aux_losses_in_training_only():
    config = moe_config(moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.001, moe_layer_freq=1, first_k_dense_replace=1)
    torch.manual_seed(5)
    model = GPTModel(config)
    assert isinstance(model.layers[0].mlp, MLP) and isinstance(model.layers[1].mlp, MoELayer)
    tokens = torch.randint(0, 64, (2, 16))
    train_loss = model(tokens, tokens)
    aux = model.layers[1].mlp.aux_loss
    model.eval()
    eval_loss = model(tokens, tokens)
    torch.testing.assert_close(train_loss, eval_loss + aux)
    stats = moe_statistics([model])
    assert set(stats["load_cv"]) == {1} and sum(stats["tokens_per_expert"][1]) == 2 * 16 * 2
    line, scalars = moe_log(stats)
    assert line.startswith("moe aux") and "moe/load_cv_layer1" in scalars and "moe/z_loss" in scalars


def test_moe_layer_frequency_and_first_dense_layers():
    config = moe_config(num_layers=6, moe_layer_freq=2, first_k_dense_replace=3)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, False, False, False, True, False]
    assert not dataclasses.replace(config, num_experts=None).is_moe_layer(4)


def test_moe_layer_pattern_as_in_megatron():
    """--moe-layer-freq also takes Megatron-LM's per-layer list expression; the config keeps the
    list, survives the round trip through flags and JSON, and DeepSeek's (first_k, freq) rule is
    found when one exists."""
    from megalm.arguments import config_to_argv
    from megalm.convert.moe_mappings import deepseek_layer_rule
    config, _ = parse_args(BASE + ["--num-layers", "6", "--moe-layer-freq", "([0]+[1]*2)*2"])
    config.validate()
    m = config.model
    assert m.moe_layer_freq == [0, 1, 1, 0, 1, 1]
    assert [m.is_moe_layer(i) for i in range(6)] == [False, True, True, False, True, True]
    assert parse_args(config_to_argv(config))[0].model.moe_layer_freq == m.moe_layer_freq
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))).model.moe_layer_freq == m.moe_layer_freq
    assert deepseek_layer_rule(m) is None  # no (first_k, freq) gives 0 1 1 0 1 1
    m.moe_layer_freq = [0, 0, 1, 0, 1, 0]
    assert deepseek_layer_rule(m) == (2, 2)
    m.moe_layer_freq, m.first_k_dense_replace = 3, 0
    assert deepseek_layer_rule(m) == (0, 3)


@pytest.mark.parametrize("value, message", [
    ("[0,1,2,1]", "must give a list of 0 (dense) and 1 (MoE)"),
    ("__import__('os')", "could not read"),
    ("[1]*2**40", "only + and * are allowed"),
    ("[1]*10000000", "the pattern is too long"),
])
def test_bad_moe_layer_pattern_is_refused_by_the_parser(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(BASE + ["--num-layers", "4", "--moe-layer-freq", value])


def test_moe_layer_pattern_must_cover_every_layer():
    config, _ = parse_args(BASE + ["--num-layers", "4", "--moe-layer-freq", "[0,1,1]"])
    with pytest.raises(ConfigError, match=re.escape("a pattern of 3 layers; the model has 4 (--num-layers)")):
        config.validate()


BASE = ["--mock-data", "--vocab-size", "128", "--train-iters", "10", "--swiglu", "--num-experts", "4"]


@pytest.mark.parametrize("flags, message", [
    (["--moe-router-topk", "5"], "--moe-router-topk (5) must be between 1 and --num-experts (4)"),
    (["--expert-model-parallel-size", "3"], "--num-experts (4) must be divisible by --expert-model-parallel-size (3)"),
    (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
    (["--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor must be positive"),
    (["--first-k-dense-replace", "12"], "leave no MoE layer"),
    (["--moe-router-num-groups", "2"], "--moe-router-num-groups and --moe-router-group-topk go together"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "--moe-router-num-groups (3) must divide"),
    (["--moe-router-num-groups", "2", "--moe-router-group-topk", "3"],
     "--moe-router-group-topk (3) must be between 1 and --moe-router-num-groups (2)"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "1", "--moe-router-topk", "2"],
     "--moe-router-topk (2) must be between --moe-router-group-topk (1) and the experts of the kept groups (1 x 1)"),
    (["--moe-router-bias-update-rate", "0"], "--moe-router-bias-update-rate must be positive"),
    (["--tensor-model-parallel-size", "4", "--moe-ffn-hidden-size", "6"],
     "--moe-ffn-hidden-size (6) must be divisible by --tensor-model-parallel-size (4)"),
])
def test_bad_moe_flags_name_the_flag(flags, message):
    config, _ = parse_args(BASE + flags)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        config.validate()


def test_moe_needs_swiglu_and_expert_parallel_needs_experts():
    config, _ = parse_args(["--mock-data", "--vocab-size", "128", "--train-iters", "10", "--num-experts", "4"])
    with pytest.raises(ConfigError, match="--num-experts needs --swiglu"):
        config.validate()
    config, _ = parse_args(["--mock-data", "--vocab-size", "128", "--train-iters", "10",
                            "--expert-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="--expert-model-parallel-size needs an MoE model"):
        config.validate()


def test_expert_parallel_size_must_divide_data_parallel_size():
    from megalm.config import ParallelConfig
    from megalm.parallel.state import data_parallel_size_for
    with pytest.raises(ConfigError, match=r"--expert-model-parallel-size \(4\) must divide the data-parallel size \(2\)"):
        data_parallel_size_for(ParallelConfig(expert_model_parallel_size=4), 2)


def test_checkpoint_with_another_expert_count_is_refused():
    config, _ = parse_args(BASE)
    saved = config.to_dict()
    config.model.num_experts = 8
    with pytest.raises(ckpt.CheckpointError, match="num_experts: checkpoint 4, this run 8"):
        ckpt.check_architecture(saved, config, "ckpt")


def test_tiny_moe_gpt_trains_and_logs_expert_load(tmp_path):
    import io

    from tests.helpers import run, tiny_config
    config = tiny_config("--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2",
                         "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32",
                         "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
                         "--moe-expert-capacity-factor", "1.5", "--micro-batch-size", "4", "--train-iters", "30",
                         "--lr", "3e-3", "--log-interval", "1", "--tensorboard-dir", str(tmp_path))
    log = io.StringIO()
    state = run(config, log)
    first, last = state.history[0][1], state.history[-1][1]
    assert last < first - 0.3, state.history
    text = log.getvalue()
    assert "moe aux" in text and "load cv" in text and "dropped" in text and "moe_router=" in text, text
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("moe/aux_loss", "moe/z_loss", "moe/load_cv_layer0", "moe/load_cv_layer1", "moe/dropped_tokens"):
        assert tag in tags


def test_checkpoint_with_other_moe_layers_is_refused_however_written():
    config, _ = parse_args(BASE + ["--num-layers", "4", "--moe-layer-freq", "[0,1,1,1]"])
    saved = config.to_dict()
    config.model.moe_layer_freq, config.model.first_k_dense_replace = 1, 1  # the same layers
    ckpt.check_architecture(saved, config, "ckpt")
    config.model.moe_layer_freq, config.model.first_k_dense_replace = 2, 0
    with pytest.raises(ckpt.CheckpointError, match=re.escape("MoE layers (--moe-layer-freq, --first-k-dense-replace): "
                                                             "checkpoint [1, 2, 3], this run [0, 2]")):
        ckpt.check_architecture(saved, config, "ckpt")


def test_expert_bias_balances_a_skewed_router_without_touching_its_weights():
    """Aux-loss-free balancing: with the router's weights fixed and skewed toward one expert, the
    bias updates alone bring the load close to uniform; the weights of the chosen experts stay
    the unbiased scores, and no gradient reaches the bias."""
    from megalm.model.moe import update_expert_bias
    torch.manual_seed(0)
    layer = MoELayer(moe_config(num_experts=8, moe_router_topk=2, moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01), 0)
    common = torch.randn(32)
    x = torch.randn(1, 256, 32) + 0.3 * common
    with torch.no_grad():
        layer.router.weight[0] += common * 0.3  # expert 0 takes most tokens
    router_weight = layer.router.weight.detach().clone()

    def load_cv():
        with torch.no_grad():
            _, _, indices, _ = layer.router(x[0])
        counts = torch.bincount(indices.reshape(-1), minlength=8).float()
        return (counts.std(unbiased=False) / counts.mean()).item()

    layer.train()
    before = load_cv()
    layer.router.tokens_since_update.zero_()
    for _ in range(60):
        layer(x).sum().backward()
        update_expert_bias([layer])
    after = load_cv()
    assert before > 1.0 and after < before / 2, (before, after)  # observed 1.15 -> 0.37
    assert layer.router.expert_bias.grad is None and torch.equal(layer.router.weight.detach(), router_weight)
    assert layer.router.expert_bias[0] < 0  # the overloaded expert is pushed down
    _, weights, indices, scores = layer.router(x[0])
    torch.testing.assert_close(weights, scores.gather(1, indices))


def test_expert_bias_is_checkpointed_and_the_resumed_run_continues(tmp_path):
    from tests.helpers import run, tiny_config
    moe = ["--swiglu", "--num-experts", "4", "--moe-router-topk", "2", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "6"]
    flags = moe + ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.05"]
    full = run(tiny_config(*flags))
    save = str(tmp_path / "ckpt")
    run(tiny_config(*flags, "--save", save, "--exit-interval", "3"))
    saved = ckpt.read_checkpoint(ckpt.iteration_dir(save, 3))["model"]
    assert saved["layers.0.mlp.router.expert_bias"].abs().max() > 0
    resumed = run(tiny_config(*flags, "--load", save))
    assert [loss for _, loss in resumed.history] == [loss for _, loss in full.history][3:]
    plain = run(tiny_config(*moe))
    assert [loss for _, loss in plain.history] != [loss for _, loss in full.history]  # the bias changes the routing
