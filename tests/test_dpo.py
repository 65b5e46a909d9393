"""DPO: every --dpo-loss against its formula and TRL's code on the same log-probabilities of a tiny
model, and posttrain_gpt.py --task dpo end to end (learning, LoRA reference = precomputed
reference, exact resume, tensor parallelism, flag errors)."""

import json
import os
import random
import re
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.test_sft_data import write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket", "garden",
         "silver", "winter", "bridge", "island", "mirror", "pepper", "castle", "orange", "violet"]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--attention-dropout", "0", "--hidden-dropout", "0"]
GOOD, BAD = "My colours are red and blue.", "I do not know."


def write_pairs(path, count: int, seed: int = 0) -> None:
    """Preference pairs in the three forms: conversational with an explicit prompt, strings with an
    implicit prompt and a margin, strings with an explicit prompt. The chosen answer is always GOOD."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            question = f"Hello {rng.choice(NAMES)}, what is your name?"
            if i % 3 == 0:
                record = {"prompt": [{"role": "user", "content": question}],
                          "chosen": [{"role": "assistant", "content": GOOD}],
                          "rejected": [{"role": "assistant", "content": BAD}]}
            elif i % 3 == 1:
                record = {"chosen": f"{question} {GOOD}", "rejected": f"{question} {BAD}", "margin": 0.5}
            else:
                record = {"prompt": question, "chosen": " " + GOOD, "rejected": " " + BAD}
            f.write(json.dumps(record) + "\n")


def run(script, *flags, ok=True, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    out = subprocess.run([*launcher, script, *flags], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def preference_setup(root) -> dict:
    """A ChatML tokenizer, pairs.jsonl and a base checkpoint (freshly initialised weights)."""
    import pretrain_gpt
    from megalm.arguments import parse_args
    from megalm.checkpoint import save_weights
    from megalm.model import GPTModel
    tok = write_tokenizer(root / "tok")
    data = root / "pairs.jsonl"
    write_pairs(data, 120)
    base = root / "base"
    config, _ = parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            os.path.join(tok, "tokenizer.json"), *MODEL, "--train-iters", "1"])
    pretrain_gpt.set_vocabulary(config)
    torch.manual_seed(0)
    save_weights(str(base), config, GPTModel(config.model).state_dict())
    return {"root": root, "tok": str(tok), "data": str(data), "base": str(base)}


def posttrain(*argv) -> str:
    """posttrain_gpt.py --task dpo / reward in this process, as its main() runs it; the log."""
    import io

    import posttrain_gpt
    from megalm.parallel import state as parallel_state
    from megalm.training.trainer import Trainer
    config, base = posttrain_gpt.configure(list(argv))
    stream = io.StringIO()
    trainer = Trainer(config, *posttrain_gpt.preference_run(config, base), log_stream=stream)
    try:
        trainer.train()
    finally:
        trainer.close()
        parallel_state.destroy()
    return stream.getvalue()


def metric(output: str, name: str, kind: str = "validation") -> list:
    prefix = r"^validation at iteration \d+ \|" if kind == "validation" else r"^iter \d+/\d+ \|"
    return [float(x) for x in re.findall(prefix + rf".*? {re.escape(name)} (-?[\d.]+)", output, re.M)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return preference_setup(tmp_path_factory.mktemp("dpo"))


def _dpo(setup, save, *flags, nproc=1):
    """The log of a DPO run (in this process; under torchrun with `nproc` > 1)."""
    argv = ["--task", "dpo", "--load", setup["base"], "--save", str(save), "--data-path", setup["data"],
            "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-3", "--lr-decay-style", "constant",
            "--log-interval", "1",
            "--eval-iters", "1", "--eval-interval", "1000", "--split", "80,20,0", "--seed", "5", *flags]
    return posttrain(*argv) if nproc == 1 else run("posttrain_gpt.py", *argv, nproc=nproc).stdout


# ---- the losses -----------------------------------------------------------------------------------


def _batch_and_models(setup):
    """A micro-batch of 4 pairs, a policy and a (differently initialised) reference model."""
    import posttrain_gpt
    from megalm.arguments import parse_args
    from megalm.data.loader import collate_tokens
    from megalm.data.preference_dataset import PREFERENCE
    from megalm.data.sft_dataset import build_sft_datasets
    from megalm.model import GPTModel
    config, _ = parse_args(["--task", "dpo", "--data-path", setup["data"], "--tokenizer-type", "HuggingFaceTokenizer",
                            "--tokenizer-model", os.path.join(setup["tok"], "tokenizer.json"), *MODEL,
                            "--train-iters", "1", "--split", "100,0,0"], sections=posttrain_gpt.SECTIONS)
    posttrain_gpt.set_vocabulary(config)
    train = build_sft_datasets(config.data, config.posttrain, 128, 1, kind=PREFERENCE)[0]
    batch = collate_tokens([train[i] for i in range(4)])
    torch.manual_seed(0)
    policy = GPTModel(config.model)
    torch.manual_seed(1)
    reference = GPTModel(config.model)
    return config, batch, policy, reference


def _trl_dpo(loss_type, beta, smoothing, logps, mask, ref_chosen, ref_rejected):
    """TRL 1.16 DPOTrainer._compute_loss on given per-token log-probabilities [2b, s] (chosen rows
    first) and completion masks, with precomputed reference log-probabilities."""
    from trl.trainer.dpo_trainer import DPOTrainer
    n = logps.shape[0]
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool))
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=smoothing, use_weighting=False, _tp_size=1, _total_train_tokens=0,
        _metrics=defaultdict(lambda: defaultdict(list)))
    completion_mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), mask.long()], dim=1)  # unshifted: [2b, s + 1]
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)


def _trl_cpo(loss_type, beta, smoothing, gamma, chosen, rejected):
    """TRL 1.16 CPOTrainer.cpo_loss (SimPO, and the label-smoothed sigmoid of cDPO) per pair."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                              label_smoothing=smoothing, accelerator=SimpleNamespace(device="cpu"))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2),
                                                 ("cdpo", 0.2), ("simpo", 0.1)])
def test_dpo_losses_equal_the_formula_and_trl(setup, loss_type, smoothing):
    from megalm.posttrain.logprobs import document_logprobs, token_logprobs, vocab_logits
    from megalm.posttrain.preference import DPOStep
    from megalm.training.trainer import model_inputs
    config, batch, policy, reference = _batch_and_models(setup)
    beta, gamma = 0.3, 0.7
    config.posttrain.dpo_loss, config.posttrain.beta, config.posttrain.label_smoothing = loss_type, beta, smoothing
    config.posttrain.simpo_gamma = gamma
    inputs = model_inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        ref = document_logprobs(token_logprobs(*vocab_logits(reference, inputs["tokens"], inputs["position_ids"],
                                                             inputs["document_ids"])[:1], inputs["labels"]),
                                inputs["labels"], inputs["document_ids"], 2)
    step = DPOStep(config)
    loss = step(dict(batch, ref_logps=ref), policy).item()

    # The same numbers laid out as TRL has them: one row per sequence, chosen rows first.
    with torch.no_grad():
        per_token = token_logprobs(vocab_logits(policy, inputs["tokens"], inputs["position_ids"],
                                                inputs["document_ids"])[0], inputs["labels"])
    labelled = inputs["labels"] != -100
    masks = [labelled & (inputs["document_ids"] == d) for d in (0, 1)]
    trl_logps = torch.cat([per_token * m for m in masks])
    trl_mask = torch.cat(masks)
    sums = [(per_token * m).sum(1) for m in masks]
    counts = [m.sum(1).float() for m in masks]
    h_c, h_r = sums[0] - ref[:, 0], sums[1] - ref[:, 1]
    delta = beta * (h_c - h_r)
    formula = {
        "sigmoid": -F.logsigmoid(delta),
        "hinge": torch.clamp(1 - delta, min=0),
        "ipo": (h_c / counts[0] - h_r / counts[1] - 1 / (2 * beta)) ** 2,
        "robust": ((1 - smoothing) * -F.logsigmoid(delta) - smoothing * -F.logsigmoid(-delta)) / (1 - 2 * smoothing),
        "cdpo": (1 - smoothing) * -F.logsigmoid(delta) + smoothing * -F.logsigmoid(-delta),
        "simpo": (1 - smoothing) * -F.logsigmoid(beta * (sums[0] / counts[0] - sums[1] / counts[1]) - gamma)
        + smoothing * -F.logsigmoid(-(beta * (sums[0] / counts[0] - sums[1] / counts[1]) - gamma)),
    }[loss_type].mean().item()
    if loss_type == "cdpo":
        trl = _trl_cpo("sigmoid", beta, smoothing, gamma, h_c, h_r).mean().item()
    elif loss_type == "simpo":
        trl = _trl_cpo("simpo", beta, smoothing, gamma, sums[0] / counts[0], sums[1] / counts[1]).mean().item()
    else:
        trl = _trl_dpo(loss_type, beta, smoothing, trl_logps, trl_mask, ref[:, 0], ref[:, 1]).item()
    assert loss == pytest.approx(formula, rel=1e-5, abs=1e-6)
    assert loss == pytest.approx(trl, rel=1e-5, abs=1e-6)
    stats = step.metrics("train")
    if loss_type != "simpo":
        assert stats["rewards/chosen"] == pytest.approx((beta * h_c).mean().item(), rel=1e-5, abs=1e-6)
        assert stats["margins"] == pytest.approx((beta * (h_c - h_r)).mean().item(), rel=1e-5, abs=1e-6)


def test_pairs_share_one_row_with_restarting_positions(setup):
    config, batch, _, _ = _batch_and_models(setup)
    docs, positions, labels = batch["document_ids"], batch["position_ids"], batch["labels"]
    for row in range(docs.shape[0]):
        for d in (0, 1):
            where = (docs[row] == d).nonzero().squeeze(1)
            assert len(where) > 0 and positions[row, where[0]] == 0
            assert (labels[row, where] != -100).any()  # each side has completion tokens
        chosen_last = (docs[row] == 0).nonzero().max()
        assert labels[row, chosen_last] != -100  # the completion's EOS / end of turn is trained


# ---- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full(setup):
    """The log of 6 DPO steps in one process, co-hosted reference."""
    return _dpo(setup, setup["root"] / "full", "--train-iters", "6")


def test_dpo_raises_held_out_preference_and_resumes_exactly(setup, full):
    root = setup["root"]
    accuracy, margins = metric(full, "accuracy"), metric(full, "margins")
    assert accuracy[-1] >= 0.9 and margins[-1] > 0.5, full[-2000:]
    assert metric(full, "loss", "iter")[-1] < 0.69 < metric(full, "loss", "iter")[0] + 1e-3  # starts at log 2
    # Stopped after 4 iterations and started again with the same command: the same steps.
    _dpo(setup, root / "resumed", "--train-iters", "6", "--exit-interval", "3")
    resumed = _dpo(setup, root / "resumed", "--train-iters", "6")
    assert metric(resumed, "loss", "iter") == metric(full, "loss", "iter")[3:]
    # The reference log-probabilities computed once before training instead of by the co-hosted copy.
    precomputed = _dpo(setup, root / "precomputed", "--train-iters", "6", "--precompute-ref-logps")
    assert metric(precomputed, "loss", "iter") == pytest.approx(metric(full, "loss", "iter"), rel=1e-5)


def test_lora_dpo_uses_the_base_as_reference_and_learns(setup):
    out = _dpo(setup, setup["root"] / "lora", "--train-iters", "4", "--lora-rank", "8", "--lora-alpha", "32",
               "--lr", "3e-3", "--dpo-loss", "robust", "--label-smoothing", "0.1")
    losses = metric(out, "loss", "iter")
    # At the start the adapters are zero: the policy is its base, the reference, and the loss
    # robust's value at a zero margin, log 2.
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert losses[-1] < losses[0] and metric(out, "margins")[-1] > 0, out[-2000:]


@pytest.mark.slow
def test_tensor_parallel_dpo_equals_one_process(setup, full):
    root = setup["root"]
    base_tp2 = str(root / "base_tp2")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_checkpoint
    assert convert_checkpoint.main(["--loader", "megalm", "--saver", "megalm", "--load-dir", setup["base"],
                                    "--save-dir", base_tp2, "--target-tensor-parallel-size", "2",
                                    "--target-pipeline-parallel-size", "1"]) == 0
    # The learning rate is constant: the first 3 steps are those of the 6-step run.
    two = _dpo(dict(setup, base=base_tp2), root / "tp2", "--train-iters", "3", "--tensor-model-parallel-size", "2",
               nproc=2)
    assert metric(two, "loss", "iter") == pytest.approx(metric(full, "loss", "iter")[:3], rel=2e-5)


@pytest.mark.parametrize("flags,message", [
    (["--task", "dpo", "--label-smoothing", "0.1"], "--label-smoothing is for --dpo-loss robust, cdpo or simpo"),
    (["--task", "dpo", "--dpo-loss", "robust", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
    (["--task", "dpo", "--beta", "0"], "--beta must be positive"),
    (["--task", "dpo", "--simpo-gamma", "1"], "--simpo-gamma is for --dpo-loss simpo"),
    (["--task", "dpo", "--dpo-loss", "simpo", "--precompute-ref-logps"], "--precompute-ref-logps: --dpo-loss simpo"),
    (["--task", "sft", "--dpo-loss", "ipo"], "--dpo-loss is for --task dpo"),
    (["--task", "dpo", "--ref-load", "/nonexistent"], "--ref-load /nonexistent: no such checkpoint directory"),
    (["--task", "dpo", "--pipeline-model-parallel-size", "2"], "runs without pipeline parallelism"),
    (["--task", "sft", "--center-rewards-coefficient", "0.1"], "--center-rewards-coefficient is for --task reward"),
    (["--task", "reward", "--center-rewards-coefficient", "-1"], "--center-rewards-coefficient must not be negative"),
])
def test_bad_flags_are_named(setup, tmp_path, capsys, flags, message):
    import posttrain_gpt
    code = posttrain_gpt.main(["--load", setup["base"], "--save", str(tmp_path / "out"), "--data-path", setup["data"],
                               "--train-iters", "1", *flags])
    assert code != 0
    assert message in capsys.readouterr().err
