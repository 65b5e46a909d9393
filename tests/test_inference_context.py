"""Sequences longer than the positions a model was trained with: refused with learned position
embeddings (naming both lengths and the fix), warned about once with RoPE, in evaluation's check
and in generation."""

import warnings

import pytest
import torch

from megalm.config import ModelConfig
from megalm.inference.context import check_context_length
from megalm.inference.generate import SamplingParams, generate
from megalm.model import GPTModel


def _config(position_embedding_type: str) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16,
                       position_embedding_type=position_embedding_type, padded_vocab_size=128)


def _model(position_embedding_type: str) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(_config(position_embedding_type)).eval()


@pytest.mark.parametrize("kind", ["learned_absolute", "rope"])
def test_lengths_within_the_trained_positions_pass_silently(kind):
    assert check_context_length(_config(kind), 16, "--seq-length 16", "pass --seq-length 16 or less") is None


def test_learned_positions_refuse_a_longer_sequence_naming_both_lengths_and_the_fix():
    with pytest.raises(ValueError) as error:
        check_context_length(_config("learned_absolute"), 1024, "--seq-length 1024", "pass --seq-length 16 or less")
    message = str(error.value)
    assert message.startswith("--seq-length 1024 is longer than the model's 16 positions")
    assert message.endswith(": pass --seq-length 16 or less")


def test_rope_past_the_trained_positions_is_a_warning():
    warning = check_context_length(_config("rope"), 1024, "--seq-length 1024", "pass --seq-length 16 or less")
    assert warning.startswith("the model was trained with 16 positions and --seq-length 1024 goes past them")
    assert "extrapolate" in warning


def test_generation_past_learned_positions_is_refused_with_the_room_left():
    with pytest.raises(ValueError, match="a prompt of 10 tokens plus 10 new tokens is longer than the model's 16 "
                                         r"positions .*: ask for at most 6 new tokens or shorten the prompt"):
        generate(_model("learned_absolute"), [[1] * 10], SamplingParams(max_new_tokens=10, temperature=0.0))
    with pytest.raises(ValueError, match="shorten the prompt to fewer than 16 tokens"):
        generate(_model("learned_absolute"), [[1] * 20], SamplingParams(max_new_tokens=1, temperature=0.0))


def test_generation_past_rope_positions_warns_once_and_goes_on():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [out] = generate(_model("rope"), [[1] * 10], SamplingParams(max_new_tokens=10, temperature=0.0))
    assert len(out.tokens) == 10
    assert [str(w.message) for w in caught] == [
        "the model was trained with 16 positions and a prompt of 10 tokens plus 10 new tokens goes past them: "
        "results beyond position 16 measure how it extrapolates"]
    assert caught[0].filename == __file__  # reported where generate() was called
