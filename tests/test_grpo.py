"""GRPO (posttrain_gpt.py --task grpo): advantages and the per-token loss of every --loss-type
against TRL 1.16's own code on one fixed batch, the reward functions, a tiny model that learns a toy
reward, exact resume, no reference model at beta 0, data- and tensor-parallel runs on fixed rollouts
against one process, and the start-up errors.

Under torchrun this file is a worker: it trains each layout it is given on fixed rollouts and rank 0
writes the losses.
"""

import io
import json
import math
import os
import re
import subprocess
import sys
import types
from collections import defaultdict

import pytest
import torch

from megalm.posttrain.grpo import GRPOTrainer, group_advantages, grpo_loss, nanstd, stop_token_ids
from megalm.posttrain.rewards import RewardError, call_reward, exact_match_answer, regex_match, think_answer_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--attention-dropout", "0", "--hidden-dropout", "0"]
LOW_IDS = 100  # the toy task: the reward is the share of completion tokens with an id below this


def low_token_reward(prompts, completions, completion_ids, **columns):
    return [sum(t < LOW_IDS for t in ids) / len(ids) if ids else 0.0 for ids in completion_ids]


# ---------------------------------------------------------------------------------- against TRL

def _trl_advantages(rewards_per_func, weights, G, scale):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions' steps (sum_then_normalize), with its nanstd."""
    from trl.trainer.utils import nanstd as trl_nanstd
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = trl_nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _trl_loss(logps, old, ref, advantages, mask, loss_type, beta, eps_low, eps_high, max_len, num_items):
    """TRL 1.16's GRPOTrainer._compute_loss itself, on an object holding only what it reads; the
    model's log-probabilities are the given ones."""
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer
    identity = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                     reduce=lambda x, reduction="sum": x)
    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        model=types.SimpleNamespace(training=True), accelerator=identity,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items))}
    return TRLGRPOTrainer._compute_loss(fake, None, inputs)


def _rollout_batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g)  # ratios inside and outside the clip range
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = torch.arange(T)[None] < lengths[:, None]
    return logps, old, ref, mask


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    """3 groups of 4 with two reward functions; None (NaN) in one function, and one completion that
    both functions left out; one group of equal rewards (std 0)."""
    nan = math.nan
    rewards = torch.tensor([[1.0, 0.5], [0.0, nan], [nan, nan], [1.0, 1.0],
                            [0.2, 0.0], [0.2, 0.0], [0.2, 0.0], [0.2, 0.0],
                            [3.0, 1.0], [0.0, 0.0], [1.5, nan], [2.0, 0.5]])
    weights = torch.tensor([1.0, 0.5])
    ours, _, _ = group_advantages(rewards.clone(), weights, 4, scale)
    expected = _trl_advantages(rewards.clone(), weights, 4, scale)
    # TRL shuffles its batch: as multisets, and (our order is TRL's before the shuffle) element-wise
    assert sorted(ours.tolist()) == pytest.approx(sorted(expected.tolist()), abs=1e-6)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert ours[2] == 0.0 and torch.all(ours[4:8] == 0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_per_token_gradient_equal_trl(loss_type, beta):
    """The loss, and its gradient with respect to every token's log-probability (the per-token loss's
    weight), equal TRL's _compute_loss on the same batch; epsilon_high != epsilon_low."""
    logps, old, ref, mask = _rollout_batch()
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.0, 0.8])
    num_items = int(mask.sum())
    ours_in = logps.clone().requires_grad_(True)
    ours, per_token, kl, _ = grpo_loss(ours_in, old, advantages, mask, loss_type, 0.2, 0.28, beta, ref,
                                       max_completion_length=10, normalizer=torch.tensor(float(num_items)))
    ours.backward()
    trl_in = logps.clone().requires_grad_(True)
    expected = _trl_loss(trl_in, old, ref, advantages, mask, loss_type, beta, 0.2, 0.28, 10, num_items)
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(ours_in.grad, trl_in.grad, atol=1e-7)
    # the per-token loss itself, as TRL's formula writes it
    ratio = torch.exp(logps - old)
    adv = advantages[:, None]
    want = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv)
    if beta:
        want = want + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    assert torch.allclose(per_token.detach(), want, atol=1e-7)
    assert (kl is None) == (beta == 0.0)


def test_nanstd_is_unbiased_and_ignores_nan():
    x = torch.tensor([1.0, 2.0, math.nan, 4.0])
    assert nanstd(x).item() == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item())
    assert math.isnan(nanstd(torch.tensor([1.0, math.nan])).item())


# ---------------------------------------------------------------------------------- rewards

def test_ready_made_rewards():
    completions = ["<think>a</think> <answer> 12 </answer>", "12", "13", "x"]
    assert exact_match_answer(None, completions, None, answer=["12", "12", "12", None]) == [1.0, 1.0, 0.0, None]
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    assert think_answer_format(None, chat, None) == [1.0, 0.0, 0.0, 0.0]
    assert regex_match(None, completions, None, pattern=[r"\d+"] * 4) == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match="\"answer\" column"):
        exact_match_answer(None, completions, None)


def test_reward_results_are_checked():
    assert call_reward("f", lambda **k: [1, None], ["p", "p"], ["a", "b"], [[1], [2]], {})[0] == 1.0
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        call_reward("m:f", lambda **k: [1.0], ["p", "p"], ["a", "b"], [[1], [2]], {})
    with pytest.raises(RewardError, match="rewards are floats or None"):
        call_reward("m:f", lambda **k: ["good", 1.0], ["p", "p"], ["a", "b"], [[1], [2]], {})


# ---------------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A ChatML tokenizer, prompts (chat and plain), and a tiny base checkpoint."""
    import pretrain_gpt
    from tests.test_sft_data import write_tokenizer
    root = tmp_path_factory.mktemp("grpo")
    tok = write_tokenizer(root / "tok")
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(12):
            prompt = [{"role": "user", "content": f"What is {i}?"}] if i % 2 else f"Tell me about {i}:"
            f.write(json.dumps({"prompt": prompt, "answer": str(i)}) + "\n")
    base = root / "base"
    assert pretrain_gpt.main(["--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                              os.path.join(tok, "tokenizer.json"), *MODEL, "--micro-batch-size", "2",
                              "--train-iters", "1", "--eval-iters", "0", "--save", str(base)]) == 0
    return {"root": root, "tok": tok, "prompts": str(prompts), "base": str(base)}


def grpo_flags(setup, save, *flags):
    return ["--task", "grpo", "--load", setup["base"], "--save", str(save), "--data-path", setup["prompts"],
            "--reward-fn", "tests.test_grpo:low_token_reward", "--num-generations", "4",
            "--max-completion-length", "6", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--seed", "3", *flags]


def run_grpo(flags, trainer_class=GRPOTrainer):
    """posttrain_gpt.py's GRPO run in this process (under torchrun: in its process group):
    (trainer, train state, log text)."""
    import posttrain_gpt
    from megalm.parallel import state as parallel_state
    config, base = posttrain_gpt.configure(flags)
    log = io.StringIO()
    trainer = trainer_class(config, posttrain_gpt.model_provider, posttrain_gpt.datasets_provider,
                            reference_path=base, log_stream=log)
    try:
        state = trainer.train()
    finally:
        trainer.close()
        if not os.environ.get("MEGALM_TEST_RUNS"):
            parallel_state.destroy()
    return trainer, state, log.getvalue()


def _metric(log: str, name: str) -> list:
    return [float(x) for x in re.findall(rf"^grpo \d+ .*?\| {re.escape(name)} ([-+\d.e]+)", log, re.M)]


def test_toy_reward_rises_and_beta_zero_holds_no_reference(setup):
    """From a random model (a quarter of its samples' tokens are rewarded), 10 steps raise the mean
    reward well above the start (0.27 -> 0.84 here); with --beta 0 no reference model exists."""
    trainer, state, log = run_grpo(grpo_flags(setup, setup["root"] / "toy", "--train-iters", "10", "--lr", "5e-2",
                                              "--num-generations", "8", "--global-batch-size", "32",
                                              "--micro-batch-size", "32"))
    rewards = _metric(log, "reward")
    assert len(rewards) == 10, log
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3, rewards
    assert trainer.reference is None and trainer.beta == 0.0
    for name in ("entropy", "completion_length", "clip_ratio/region_mean", "generation_tokens_per_s",
                 "training_tokens_per_s"):
        assert len(_metric(log, name)) == 10, name


def test_resume_is_exact_with_kl_and_lora(setup):
    """--beta > 0 with LoRA: the reference is the adapters-off base (no copy); 2 + 2 iterations with
    a checkpoint between equal 4 in a row (the rollouts' prompts and samples included)."""
    flags = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "all-linear", "--beta", "0.05",
             "--num-iterations", "2", "--loss-type", "grpo"]
    trainer, whole, log = run_grpo(grpo_flags(setup, setup["root"] / "whole", "--train-iters", "4", *flags))
    assert trainer.reference is not None and trainer.reference.copy is None
    assert _metric(log, "kl")[0] == pytest.approx(0.0, abs=1e-7) and _metric(log, "kl")[-1] > 0
    cut = setup["root"] / "cut"
    _, first, log1 = run_grpo(grpo_flags(setup, cut, "--train-iters", "4", "--exit-interval", "2",
                                         "--save-interval", "2", *flags))
    _, second, log2 = run_grpo(grpo_flags(setup, cut, "--train-iters", "4", *flags))
    assert "resumed from" in log2
    assert [loss for _, loss in first.history + second.history] == [loss for _, loss in whole.history]
    assert _metric(log1, "reward") + _metric(log2, "reward") == _metric(log, "reward")


def test_start_up_errors_name_the_flag(setup, capsys):
    import posttrain_gpt
    cases = [
        (["--reward-fn", "nonexistent_module:f"], "cannot import nonexistent_module"),
        (["--reward-fn", "megalm.posttrain.rewards:nope"], "has no function nope"),
        (["--reward-fn", "tests.test_grpo:low_token_reward", "x:y", "--reward-weights", "1"],
         "--reward-weights gives 1 weights for 2"),
        (["--num-generations", "1"], "--num-generations must be at least 2"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--num-iterations", "2", "--save-interval", "3"], "--save-interval 3 must be a multiple of --num-iterations 2"),
        (["--global-batch-size", "6", "--micro-batch-size", "2"], "must be a multiple of 4"),
        (["--max-completion-length", "64"], "leaves no room for a prompt"),
        (["--beta", "-1"], "--beta must not be negative"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "2"], "tensor and data parallelism only"),
    ]
    for extra, message in cases:
        flags = grpo_flags(setup, setup["root"] / "bad", "--train-iters", "1")
        if extra[0] == "--reward-fn":
            i = flags.index("--reward-fn")
            del flags[i:i + 2]
        assert posttrain_gpt.main(flags + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert not os.path.exists(setup["root"] / "bad" / "iter_0000001")


def test_stop_tokens_of_a_chatml_tokenizer(setup):
    from megalm.data.tokenizer.huggingface import HuggingFaceTokenizer
    tokenizer = HuggingFaceTokenizer(os.path.join(setup["tok"], "tokenizer.json"))
    names = {tokenizer.decode([i]) for i in stop_token_ids(tokenizer)}
    assert names == {"<|endoftext|>", "<|im_end|>"}


def test_a_reward_model_checkpoint_is_a_reward_function(setup):
    """--reward-fn DIR: a model trained with --task reward scores prompt + completion, padded batches
    as each row alone, and drives a GRPO run."""
    import posttrain_gpt
    from megalm.posttrain.preference import sequence_rewards
    from megalm.posttrain.rewards import RewardModel
    pairs = setup["root"] / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Tell me about {i}:", "chosen": " a spider", "rejected": " seven"}) + "\n")
    judge = setup["root"] / "judge"
    assert posttrain_gpt.main(["--task", "reward", "--load", setup["base"], "--save", str(judge), "--data-path",
                               str(pairs), "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "1",
                               "--eval-iters", "0", "--split", "100,0,0"]) == 0
    model = RewardModel(str(judge), torch.device("cpu"))
    prompts = ["Tell me about 3:", [{"role": "user", "content": "What is 3?"}]]
    completions = [" a spider has eight legs", [{"role": "assistant", "content": "Paris"}]]
    scores = model(prompts, completions)
    alone = [sequence_rewards(model.model, torch.tensor([model.encode(p, c)]))[0, 0].item()
             for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(alone, abs=1e-5) and scores[0] != scores[1]
    _, _, log = run_grpo(grpo_flags(setup, setup["root"] / "judged", "--train-iters", "1") + ["--reward-fn", str(judge)])
    assert len(_metric(log, "rewards/judge/mean")) == 1, log


# ---------------------------------------------------------------------------------- parallel

class FixedRollouts(GRPOTrainer):
    """Completions that depend on the prompt and the sample's number only: the same in every layout."""

    def sample(self, prompt_ids, params):
        from megalm.model.generation import Generation
        out = []
        for k, prompt in enumerate(prompt_ids):
            sample = k % self.grpo.num_generations  # the same in every data-parallel layout
            n = 2 + (sum(prompt) + sample) % 5
            tokens = [(prompt[-1] * 7 + 13 * j + 31 * sample) % 300 for j in range(n)]
            stop = self.stop_ids[0] if n % 2 else None
            out.append(Generation(tokens=tokens, finish_reason="stop_token" if stop is not None else "length",
                                  stop_token=stop))
        return out


LAYOUTS = {"dp2": [], "tp2": ["--tensor-model-parallel-size", "2"]}


def parallel_flags(setup, name, base=None):
    flags = grpo_flags(setup, setup["root"] / f"par_{name}", "--train-iters", "3", "--beta", "0.1",
                       "--num-iterations", "3", "--loss-type", "dapo", "--lr", "3e-3")
    if base is not None:
        flags[flags.index("--load") + 1] = base
    return flags


def sampled_tokens(trainer) -> list:
    """The trained policy's samples of two prompts (under tensor parallelism: on its shards)."""
    from megalm.model.generation import SamplingParams
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    return [g.tokens for g in GRPOTrainer.sample(trainer, [[5, 6, 7], [8, 9]], params)]


def test_data_and_tensor_parallel_equal_one_process_on_fixed_rollouts(setup):
    """Same loss at every step (the gradients of steps 1 and 2 show in the losses of 2 and 3), with
    the dapo normalizer over the global batch, the reference's KL and mu = 3; the tensor-parallel
    policy samples the tokens the single process samples, on both ranks."""
    trainer, reference, _ = run_grpo(parallel_flags(setup, "one"), FixedRollouts)
    expected = [loss for _, loss in reference.history]
    expected_tokens = sampled_tokens(trainer)
    out = str(setup["root"] / "parallel.json")
    tp2_base = str(setup["root"] / "base_tp2")
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--loader", "megalm", "--saver", "megalm",
                    "--load-dir", setup["base"], "--save-dir", tp2_base, "--target-tensor-parallel-size", "2",
                    "--target-pipeline-parallel-size", "1"], cwd=ROOT, check=True, capture_output=True)
    runs = {name: parallel_flags(setup, name, tp2_base if name == "tp2" else None) + flags
            for name, flags in LAYOUTS.items()}
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGALM_TEST_RUNS=json.dumps(runs), MEGALM_TEST_OUT=out,
               PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", os.path.abspath(__file__)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    with open(out) as f:
        losses = json.load(f)
    assert expected[0] != expected[-1]
    for name in LAYOUTS:
        assert losses[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert losses["tp2_tokens"] == [expected_tokens, expected_tokens]


def _worker() -> None:
    import torch.distributed as dist

    from megalm.parallel import state as parallel_state
    results = {}
    for name, flags in json.loads(os.environ["MEGALM_TEST_RUNS"]).items():
        trainer, state, _ = run_grpo(flags, FixedRollouts)
        results[name] = [loss for _, loss in state.history]
        if name == "tp2":
            ranks = [None, None]
            dist.all_gather_object(ranks, sampled_tokens(trainer))
            results["tp2_tokens"] = ranks
    if dist.get_rank() == 0:
        with open(os.environ["MEGALM_TEST_OUT"], "w") as f:
            json.dump(results, f)
    parallel_state.destroy()


if __name__ == "__main__":
    _worker()
