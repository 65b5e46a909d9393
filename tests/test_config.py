"""Start-up validation: every bad flag combination stops with a message naming the flag."""

import re
import subprocess
import sys

import pytest

from megalm.arguments import config_to_argv, parse_args
from megalm.config import Config, ConfigError

BASE = ["--mock-data", "--vocab-size", "128", "--train-iters", "10"]


def check(flags, data_parallel_size=1):
    config, _ = parse_args(flags)
    return config.validate(data_parallel_size)


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "100", "--num-attention-heads", "12"], "--num-attention-heads (12) must divide --hidden-size (100)"),
    (["--num-attention-heads", "12", "--num-query-groups", "5"], "--num-query-groups (5) must divide --num-attention-heads (12)"),
    (["--micro-batch-size", "4", "--global-batch-size", "10"], "--global-batch-size (10) must be divisible by --micro-batch-size (4)"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 are mutually exclusive"),
    (["--seq-length", "2048", "--max-position-embeddings", "1024"], "--max-position-embeddings (1024) is smaller than --seq-length"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr (1.0) is larger than --lr"),
    (["--lr-warmup-iters", "20"], "--lr-warmup-iters (20) is longer than --lr-decay-iters (10)"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--train-tokens", "1000"], "--train-iters and --train-tokens are mutually exclusive"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)"),
])
def test_bad_flag_combinations_name_the_flag(flags, message):
    with pytest.raises(ConfigError) as e:
        check(BASE + flags)
    assert message in str(e.value)


def test_global_batch_must_divide_by_data_parallel_size():
    with pytest.raises(ConfigError, match=r"micro-batch-size \(2\) x data-parallel size \(4\)"):
        check(BASE + ["--micro-batch-size", "2", "--global-batch-size", "12"], data_parallel_size=4)


def test_missing_data_path_without_mock_data():
    with pytest.raises(ConfigError, match="--data-path PREFIX .* or --mock-data"):
        check(["--train-iters", "10"])


def test_mock_data_needs_vocab_size():
    with pytest.raises(ConfigError, match="--vocab-size"):
        check(["--mock-data", "--train-iters", "10"])


def test_train_length_is_required():
    with pytest.raises(ConfigError, match="--train-iters or --train-tokens"):
        check(["--mock-data", "--vocab-size", "128"])


def test_unknown_flag_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--num-layer", "4"])
    assert "--num-layer" in str(e.value) and "--num-layers" in str(e.value)


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="--normalization"):
        parse_args(BASE + ["--normalization", "BatchNorm"])


def test_train_tokens_sets_iterations():
    config, _ = parse_args(["--mock-data", "--vocab-size", "128", "--train-tokens", "10000",
                            "--seq-length", "100", "--micro-batch-size", "2", "--global-batch-size", "8"])
    assert config.resolve().train.train_iters == 13  # ceil(10000 / (8 x 100))
    # Without --global-batch-size the batch, and so the iterations, follow the data-parallel size.
    config.train.global_batch_size = None
    assert config.resolve(data_parallel_size=2).train.train_iters == 25  # ceil(10000 / (2 x 2 x 100))


def test_defaults_and_derived_values():
    config = check(BASE + ["--hidden-size", "256", "--num-attention-heads", "8", "--swiglu"]).resolve()
    m = config.model
    assert m.head_dim == 32 and m.query_groups == 8
    assert m.ffn_size == int(4 * 256 * 2 / 3 / 64) * 64
    assert config.train.global_batch_size == config.train.micro_batch_size
    assert config.optim.lr_decay_iters == 10


def test_validate_checks_and_resolve_fills_in_without_changing_the_config():
    """validate() changes nothing; resolve(dp) returns a filled-in copy, so one config can be
    resolved for one process and again for eight."""
    config, _ = parse_args(BASE + ["--micro-batch-size", "2"])
    before = config.to_dict()
    assert config.validate(data_parallel_size=8).to_dict() == before
    one, eight = config.resolve(1), config.resolve(8)
    assert config.to_dict() == before
    assert (one.train.global_batch_size, eight.train.global_batch_size) == (2, 16)
    assert one.optim.lr_decay_iters == eight.optim.lr_decay_iters == 10
    assert config.train.global_batch_size is None and config.optim.lr_decay_iters is None


@pytest.mark.parametrize("flags, message", [
    (["--fp16", "--loss-scale", "0"], "--loss-scale must be a finite number of at least 1, got 0.0"),
    (["--fp16", "--loss-scale", "1e-30"], "--loss-scale must be a finite number of at least 1, got 1e-30"),
    (["--fp16", "--initial-loss-scale", "0"], "--initial-loss-scale must be a finite number of at least 1"),
    (["--fp16", "--initial-loss-scale", "inf"], "--initial-loss-scale must be a finite number of at least 1"),
    (["--fp16", "--min-loss-scale", "0"], "--min-loss-scale must be positive, got 0.0"),
    (["--fp16", "--loss-scale-window", "0"], "--loss-scale-window must be positive"),
    (["--fp16", "--hysteresis", "0"], "--hysteresis must be positive"),
])
def test_bad_loss_scale_is_refused_at_start_up(flags, message):
    """A loss scale of 0 divided by zero when the gradients were unscaled, and 1e-30 trained with
    every fp16 gradient flushed to zero; both stop at start-up now."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(BASE + flags)


def test_negative_flags_and_round_trip():
    config = check(BASE + ["--disable-bias-linear", "--untie-embeddings-and-output-weights",
                           "--data-cache-path", "/tmp/x"])
    assert config.model.add_bias_linear is False
    assert config.model.untie_embeddings_and_output_weights is True
    again, _ = parse_args(config_to_argv(config))
    assert again.validate() == config
    assert Config.from_dict(config.to_dict()) == config


def test_cli_reports_config_errors_without_traceback():
    out = subprocess.run([sys.executable, "pretrain_gpt.py"] + BASE + ["--bf16", "--fp16"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "error: --bf16 and --fp16 are mutually exclusive" in out.stderr
    assert "Traceback" not in out.stderr
