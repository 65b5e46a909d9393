"""Start-up validation: every bad flag combination stops with a message naming the flag."""

import os
import re
import subprocess
import sys

import pytest

from megalm.arguments import build_parser, config_to_argv, parse_args
from megalm.config import SECTIONS, TOKENIZER_TYPES, Config, ConfigError

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


def help_text(monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # each flag's help on one line: a default is never split
    return build_parser("Pre-train a GPT model.").format_help()


def flag_help(text: str, flag: str) -> str:
    """The help of `flag` in --help: from its line to the next flag or group."""
    block = re.search(rf"^  {re.escape(flag)}\b.*?(?=^  -|^\S|\Z)", text, re.M | re.S)
    assert block, f"{flag} is not in --help"
    return block.group(0)


def groups(text: str) -> dict:
    """--help's groups: title -> the flags listed under it."""
    titled = re.findall(r"^(\S[^\n]*):\n(.*?)(?=^\S|\Z)", text.split("\n\n", 1)[1], re.M | re.S)
    return {title: re.findall(r"^  (?:-\w, )?(--[\w-]+)", body, re.M) for title, body in titled}


def test_help_names_values_by_kind_not_by_section(monkeypatch):
    """Megatron users read `--lr LR`, not `--lr OPTIM.LR`: a value is named N (int), X (float),
    DIR / PATH, or by its choices."""
    parser = build_parser()
    for action in parser._actions:
        metavar = str(action.metavar)
        assert "." not in metavar and not any(s.upper() in metavar for s in SECTIONS), action.option_strings
    text = help_text(monkeypatch)
    for invocation in ("--lr X", "--num-layers N", "--moe-shared-expert-intermediate-size N", "--save DIR",
                       "--load DIR", "--tokenizer-model PATH", "--split N,N,N", "--moe-layer-freq N|PATTERN",
                       "--data-path [WEIGHT] PREFIX [[WEIGHT] PREFIX ...]", "--normalization {LayerNorm,RMSNorm}"):
        assert f"  {invocation}" in text, invocation
    assert not re.search(r"(MODEL|PARALLEL|OPTIM|TRAIN|DATA)\.", text)


def test_help_states_each_default_once_and_never_none(monkeypatch):
    text = help_text(monkeypatch)
    assert "(default: None)" not in text and "(default: [])" not in text
    assert all(line.count("default:") <= 1 for line in text.splitlines())
    assert "(default: one per query head)." in flag_help(text, "--num-query-groups")
    assert "(default: 12)" in flag_help(text, "--num-layers")
    assert "(default: 969,30,1)" in flag_help(text, "--split")


def test_switches_show_no_default(monkeypatch):
    """`--disable-bias-linear ... (default: True)` read as if biases were off by default: a switch's
    help says what it does, and no default is printed for it."""
    text = help_text(monkeypatch)
    for flag in ("--disable-bias-linear", "--no-overlap-grad-reduce", "--no-verify-checkpoint"):
        assert "default" not in flag_help(text, flag), flag
    switches = [a for a in build_parser()._actions if a.nargs == 0 and a.option_strings != ["-h", "--help"]]
    assert len(switches) > 10
    for action in switches:
        assert "(default" not in flag_help(text, action.option_strings[0]), action.option_strings


def test_negated_flags_switch_their_field_off():
    config, _ = parse_args(["--no-verify-checkpoint", "--no-overlap-grad-reduce"])
    assert config.train.verify_checkpoint is False and config.parallel.overlap_grad_reduce is False
    assert config.model.add_bias_linear is True


def test_planner_help_shows_no_empty_defaults():
    """tools/parallel_plan.py builds on the same parser with its own help formatter."""
    out = subprocess.run([sys.executable, "tools/parallel_plan.py", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "1000"})
    assert out.returncode == 0, out.stderr
    assert "(default: None)" not in out.stdout
    assert "default" not in flag_help(out.stdout, "--disable-bias-linear")
    assert "  --lr X " in out.stdout


def test_tokenizer_type_is_one_of_the_tokenizers(monkeypatch):
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--tokenizer-type", "Bogus"])
    assert "--tokenizer-type" in str(e.value) and "'Bogus'" in str(e.value)
    assert all(name in str(e.value) for name in TOKENIZER_TYPES)
    assert "--tokenizer-type {" + ",".join(TOKENIZER_TYPES) + "}" in help_text(monkeypatch)
    config, _ = parse_args(BASE + ["--tokenizer-type", "NullTokenizer"])
    assert config.data.tokenizer_type == "NullTokenizer"


def test_text_flags_with_fixed_values_have_choices():
    """A text flag takes a path, a pattern or one of its choices; none lists its values in prose only."""
    free = {a.option_strings[0] for a in build_parser()._actions
            if a.type is str and a.choices is None and a.metavar not in ("DIR", "PATH")}
    assert free == {"--split"}


def test_help_groups_flags_by_concern(monkeypatch):
    found = groups(help_text(monkeypatch))
    moe = {a.option_strings[0] for a in build_parser()._actions
           if a.option_strings[0].startswith("--moe-")} | {"--num-experts", "--first-k-dense-replace"}
    assert moe <= set(found["mixture of experts"])
    assert found["kernels"] == ["--attention-backend", "--normalization-backend", "--cross-entropy-fusion"]
    assert {"--bf16", "--fp16", "--loss-scale", "--initial-loss-scale"} <= set(found["mixed precision"])
    assert {"--save", "--load", "--save-interval", "--finetune", "--no-verify-checkpoint"} <= set(found["checkpoints"])
    assert {"--lr", "--min-lr", "--lr-warmup-iters", "--lr-decay-style"} <= set(found["learning-rate schedule"])
    assert {"--micro-batch-size", "--train-iters", "--seed", "--device", "--compile"} <= set(found["training"])
    # A field that names no group is under its dataclass's usual one.
    assert "--swiglu" in found["architecture"] and "--tensor-model-parallel-size" in found["parallelism"]
    assert not {"model", "parallel", "optim", "train"} & set(found)


def test_every_flag_is_in_help_exactly_once(monkeypatch):
    text = help_text(monkeypatch)
    listed = [flag for flags in groups(text).values() for flag in flags]
    flags = [a.option_strings[-1] for a in build_parser()._actions]
    assert sorted(listed) == sorted(flags) and len(set(listed)) == len(listed)
    assert re.fullmatch(r"usage: \S+ \[FLAGS\]", text.split("\n\n", 1)[0])  # the groups list them, once


def test_percent_in_help_renders(monkeypatch):
    text = help_text(monkeypatch)
    assert "(layer i with i % freq == 0)" in text and "(default: 10% of the decay span)" in text
    assert "%%" not in text


def test_defaults_come_from_the_dataclasses():
    """argparse holds no default of its own: no flags give exactly the dataclasses' defaults."""
    config, ns = parse_args([])
    assert config == Config() and not vars(ns)
    assert config.data.data_path == [] and config.data.data_path is not Config().data.data_path


def test_round_trip_of_every_kind_of_flag():
    flags = BASE + ["--tokenizer-type", "NullTokenizer", "--data-cache-path", "/tmp/x", "--swiglu",
                    "--num-experts", "4", "--moe-layer-freq", "([0]+[1]*3)*3", "--lr", "1e-3",
                    "--position-embedding-type", "rope", "--no-verify-checkpoint", "--no-overlap-grad-reduce",
                    "--disable-bias-linear"]
    config = check(flags)
    again, _ = parse_args(config_to_argv(config))
    assert again == config and again.model.moe_layer_freq == [0, 1, 1, 1] * 3
