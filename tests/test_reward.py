"""Reward models: posttrain_gpt.py --task reward learns to rank held-out pairs, its loss is
Bradley-Terry's, and the exported *ForSequenceClassification gives transformers the same scores."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.test_dpo import metric, posttrain, preference_setup


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    setup = preference_setup(tmp_path_factory.mktemp("reward"))
    save = setup["root"] / "reward"
    out = posttrain("--task", "reward", "--load", setup["base"], "--save", str(save), "--data-path", setup["data"],
                    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-3", "--train-iters", "6",
                    "--log-interval", "1", "--eval-iters", "2", "--eval-interval", "1000", "--split", "80,20,0",
                    "--seed", "5", "--center-rewards-coefficient", "0.01")
    return dict(setup, save=str(save), out=out)


def test_reward_model_ranks_held_out_pairs(trained):
    accuracy = metric(trained["out"], "accuracy")
    assert accuracy and accuracy[-1] >= 0.9, trained["out"][-2000:]
    assert metric(trained["out"], "margins")[-1] > 0


def test_bradley_terry_loss_with_margin_and_centering():
    from megalm.posttrain.preference import bradley_terry_loss
    chosen, rejected, margin = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.2, 0.5, -1.0]), torch.tensor([0.5, 0, 1])
    expected = -F.logsigmoid(chosen - rejected - margin).mean() + 0.1 * ((chosen + rejected) ** 2).mean()
    assert bradley_terry_loss(chosen, rejected, margin, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_exported_reward_model_scores_as_transformers(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
    from megalm.convert.hf import megalm_to_hf
    from megalm.model import GPTModel
    from megalm.posttrain.heads import add_score_head
    from megalm.posttrain.preference import sequence_rewards
    hf_dir = str(tmp_path / "hf")
    megalm_to_hf(trained["save"], hf_dir, log=lambda *a: None)
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    found = open_checkpoint(trained["save"])
    config = checkpoint_config(found)
    model = add_score_head(GPTModel(config.model), config)
    model.load_state_dict(found["model"])
    model.eval()
    texts = ["Hello apple, what is your name? My colours are red and blue.<|endoftext|>",
             "Hello river, what is your name? I do not know.<|endoftext|>",
             "<|im_start|>user\nHello stone<|im_end|>\n<|im_start|>assistant\nI do not know.<|im_end|>\n"]
    scores = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ours = sequence_rewards(model, ids)[0, 0].item()
            theirs = hf(input_ids=ids).logits[0, 0].item()
        assert ours == pytest.approx(theirs, abs=1e-5)
        scores.append(ours)
    assert scores[0] > scores[1]  # the trained preference survives the export


def test_lora_reward_model_merges_and_exports(trained, tmp_path):
    """LoRA adapters and the trained head: merged by tools/lora.py, exported, scored by transformers."""
    import sys

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
    from megalm.convert.hf import megalm_to_hf
    from megalm.model import GPTModel
    from megalm.posttrain.heads import add_score_head
    from megalm.posttrain.preference import sequence_rewards
    save = tmp_path / "lora"
    out = posttrain("--task", "reward", "--load", trained["base"], "--save", str(save), "--data-path",
                    trained["data"], "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-2",
                    "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0", "--split", "80,20,0",
                    "--lora-rank", "4", "--lora-target-modules", "all-linear")
    assert "trainable" in out
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import lora as lora_tool
    assert lora_tool.main(["merge", "--load", str(save), "--save", str(tmp_path / "merged")]) == 0
    megalm_to_hf(str(tmp_path / "merged"), str(tmp_path / "hf"), log=lambda *a: None)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    found = open_checkpoint(str(tmp_path / "merged"))
    config = checkpoint_config(found)
    model = add_score_head(GPTModel(config.model), config)
    model.load_state_dict(found["model"])
    ids = torch.tensor([tokenizer("Hello apple, what is your name? I do not know.<|endoftext|>",
                                  add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert sequence_rewards(model.eval(), ids)[0, 0].item() == pytest.approx(hf(input_ids=ids).logits[0, 0].item(),
                                                                                 abs=1e-5)
