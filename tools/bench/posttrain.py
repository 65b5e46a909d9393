#!/usr/bin/env python
"""Post-training throughput against Hugging Face TRL, in one process, ratios printed.

One function per benchmark; each times megalm and its TRL counterpart on the same model and data:

- `bench_dpo`: posttrain_gpt.py --task dpo (full fine-tuning, co-hosted reference, sigmoid loss)
  against TRL's DPOTrainer (with a reference model) on the same Llama-shaped model (megalm's
  freshly initialised base, exported to Hugging Face with the converter) and the same
  conversational preference pairs, the same batch (micro-batch x accumulation) and learning rate.

Reported: preference pairs per second and real (non-padding) tokens per second of chosen and
rejected together, over the optimizer steps after --warmup (a step from its first forward to the
next step's first forward), and megalm / TRL. TRL truncates each sequence to --seq-length and pads
the chosen and rejected rows of a batch to its longest; megalm lays each pair into one row of
2 x --seq-length (chosen and rejected as two documents).

- `bench_grpo`: posttrain_gpt.py --task grpo against TRL's GRPOTrainer without vLLM (its own
  `model.generate`), same model, the pairs' prompts, the same reward (a regex on the completion),
  --prompts x --num-generations completions of at most --max-completion-length tokens per optimizer
  step, beta 0, loss dapo. A random base model rarely stops early: both generate nearly every token
  they may. Reported: the mean step time after --warmup, split into the rollout (generation, rewards,
  advantages; of which the generation itself, with its tokens/s) and the training (forward, backward,
  optimizer), and TRL / megalm for each.

    python tools/bench/posttrain.py                      # small model, suits a CPU
    python tools/bench/posttrain.py --num-layers 16 --hidden-size 2048 --num-attention-heads 16 \\
        --seq-length 1024 --micro-batch-size 8 --steps 20            # on a GPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tools.bench.finetune import model_flags, sentence, vocabulary_words, write_tokenizer  # noqa: E402


def preference_pairs(count: int, seed: int) -> list:
    """Conversational pairs: a question of 10-60 words, two answers of 10-120 words."""
    rng = random.Random(seed)
    words = vocabulary_words(rng)
    pairs = []
    for _ in range(count):
        prompt = [{"role": "user", "content": sentence(rng, words, rng.randint(10, 60))}]
        pairs.append({"prompt": prompt,
                      "chosen": [{"role": "assistant", "content": sentence(rng, words, rng.randint(10, 120))}],
                      "rejected": [{"role": "assistant", "content": sentence(rng, words, rng.randint(10, 120))}]})
    return pairs


def prepare(args) -> dict:
    """Tokenizer, pairs jsonl, a megalm base checkpoint (fresh weights) and its Hugging Face export."""
    import torch

    import posttrain_gpt
    from megalm.arguments import parse_args
    from megalm.checkpoint import save_weights
    from megalm.convert.hf import megalm_to_hf
    from megalm.model import GPTModel
    root = args.work_dir
    paths = {"tok": os.path.join(root, "tokenizer"), "data": os.path.join(root, "pairs.jsonl"),
             "base": os.path.join(root, "base"), "hf": os.path.join(root, "base_hf")}
    pairs = preference_pairs(args.pairs, args.seed)
    write_tokenizer(paths["tok"], [{"messages": p["prompt"] + p["chosen"] + p["rejected"]} for p in pairs],
                    args.vocab_size)
    with open(paths["data"], "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    config, _ = parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            os.path.join(paths["tok"], "tokenizer.json"), *model_flags(args), "--train-iters", "1"])
    posttrain_gpt.set_vocabulary(config)
    torch.manual_seed(args.seed)
    save_weights(paths["base"], config, GPTModel(config.model).state_dict())
    megalm_to_hf(paths["base"], paths["hf"], force=True, log=lambda *a: None)
    return paths


def _rate(starts: list, units: list, warmup: int) -> float:
    if len(starts) < warmup + 2:
        raise SystemExit(f"error: {len(starts)} steps ran, too few to time any after --warmup {warmup}")
    return sum(units[warmup:-1]) / (starts[-1] - starts[warmup])


def megalm_dpo(args, paths: dict) -> dict:
    """posttrain_gpt.py --task dpo in this process; pairs/s and real tokens/s."""
    import posttrain_gpt
    from megalm.parallel import state as parallel_state
    from megalm.training.trainer import Trainer
    argv = ["--task", "dpo", "--load", paths["base"], "--data-path", paths["data"], "--split", "100,0,0",
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size",
            str(args.micro_batch_size * args.accumulation), "--train-iters", str(args.steps), "--lr", "1e-5",
            "--eval-iters", "0", "--log-interval", str(args.steps), "--seed", str(args.seed),
            "--seq-length", str(2 * args.seq_length), "--max-position-embeddings", str(2 * args.seq_length),
            "--beta", "0.1"]  # a row holds chosen and rejected
    config, base = posttrain_gpt.configure(argv)
    starts, pairs, tokens = [], [], []

    class Timed(Trainer):
        def train_step(self, data):
            def counted():
                for batch in data:
                    pairs[-1] += batch["tokens"].shape[0]
                    tokens[-1] += int((batch["document_ids"] < 2).sum()) + 2 * batch["tokens"].shape[0]
                    yield batch
            starts.append(time.perf_counter())
            pairs.append(0)
            tokens.append(0)  # positions + the one token per side a shifted row leaves out
            return super().train_step(counted())

    trainer = Timed(config, *posttrain_gpt.preference_run(config, base), log_stream=io.StringIO())
    try:
        trainer.train()
    finally:
        trainer.close()
        parallel_state.destroy()
    return {"pairs_per_s": _rate(starts, pairs, args.warmup), "tokens_per_s": _rate(starts, tokens, args.warmup)}


def trl_dpo(args, paths: dict) -> dict:
    """TRL's DPOTrainer with a reference model in this process; pairs/s and real tokens/s."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    tokenizer = AutoTokenizer.from_pretrained(paths["tok"])  # with the chat template megalm reads
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32)
    with open(paths["data"]) as f:
        data = Dataset.from_list([json.loads(line) for line in f])
    starts, pairs, tokens = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            starts.append(time.perf_counter())

    config = DPOConfig(output_dir=os.path.join(args.work_dir, "trl"), per_device_train_batch_size=args.micro_batch_size,
                       gradient_accumulation_steps=args.accumulation, max_steps=args.steps, learning_rate=1e-5,
                       beta=0.1, max_length=args.seq_length, logging_steps=args.steps, save_strategy="no",
                       report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed,
                       dataloader_num_workers=0, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    # Every step reads micro-batch x accumulation pairs; their real tokens from TRL's own tokenization.
    tokenized = trainer.train_dataset
    per_pair = [len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in tokenized] \
        if "prompt_ids" in tokenized.column_names else None
    step_pairs = args.micro_batch_size * args.accumulation
    pairs = [step_pairs] * len(starts)
    mean_tokens = sum(per_pair) / len(per_pair) if per_pair else float("nan")
    tokens = [step_pairs * mean_tokens] * len(starts)
    return {"pairs_per_s": _rate(starts, pairs, args.warmup), "tokens_per_s": _rate(starts, tokens, args.warmup)}


def bench_dpo(args, paths: dict) -> None:
    ours, theirs = megalm_dpo(args, paths), trl_dpo(args, paths)
    print(f"DPO  megalm {ours['pairs_per_s']:.2f} pairs/s {ours['tokens_per_s']:.0f} tok/s | "
          f"TRL DPOTrainer {theirs['pairs_per_s']:.2f} pairs/s {theirs['tokens_per_s']:.0f} tok/s | "
          f"megalm / TRL {ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x", flush=True)


# Some completions match, most not: rewards with a spread, as a real task has.
REWARD_PATTERN = r".*\b[a-z]{4}\b.*"


class GRPOSteps:
    """Per optimizer step: wall time, rollout time, generation time, completion tokens."""

    def __init__(self):
        self.rows = []

    def summary(self, warmup: int) -> dict:
        timed = self.rows[warmup:]
        if not timed:
            raise SystemExit(f"error: {len(self.rows)} steps ran, too few to time any after --warmup {warmup}")
        mean = {key: sum(r[key] for r in timed) / len(timed) for key in timed[0]}
        return {"step_s": mean["step_s"], "rollout_s": mean["rollout_s"], "generation_s": mean["generation_s"],
                "training_s": mean["step_s"] - mean["rollout_s"],
                "generated_tokens_per_s": mean["tokens"] / mean["generation_s"] if mean["generation_s"] else 0.0}


def megalm_grpo(args, paths: dict) -> dict:
    """posttrain_gpt.py --task grpo in this process; its step split into rollout and training."""
    import posttrain_gpt
    from megalm.parallel import state as parallel_state
    from megalm.posttrain.grpo import GRPOTrainer
    steps = GRPOSteps()

    class Timed(GRPOTrainer):
        def train_step(self, data):
            before, start = dict(self.stats), time.perf_counter()
            out = super().train_step(data)
            steps.rows.append({"step_s": time.perf_counter() - start,
                               "rollout_s": self.stats["rollout_s"] - before["rollout_s"],
                               "generation_s": self.stats["generation_s"] - before["generation_s"],
                               "tokens": self.stats["generated_tokens"] - before["generated_tokens"]})
            return out

    completions = str(args.prompts * args.num_generations)
    argv = ["--task", "grpo", "--load", paths["base"], "--data-path", paths["prompts"],
            "--reward-fn", "megalm.posttrain.rewards:regex_match", "--num-generations", str(args.num_generations),
            "--max-completion-length", str(args.max_completion_length), "--micro-batch-size", completions,
            "--global-batch-size", completions, "--train-iters", str(args.warmup + args.steps), "--lr", "1e-5",
            "--loss-type", "dapo", "--log-interval", "1000000", "--eval-iters", "0", "--seed", str(args.seed),
            "--seq-length", str(args.seq_length)]
    config, _ = posttrain_gpt.configure(argv)
    trainer = Timed(config, posttrain_gpt.model_provider, posttrain_gpt.datasets_provider, log_stream=io.StringIO())
    try:
        trainer.train()
    finally:
        trainer.close()
        parallel_state.destroy()
    return steps.summary(args.warmup)


def trl_grpo(args, paths: dict) -> dict:
    """TRL's GRPOTrainer without vLLM (its model.generate) in this process, timed the same way."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from megalm.posttrain.rewards import regex_match
    steps, current = GRPOSteps(), {}

    class Timed(GRPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch):
            now = time.perf_counter()  # one training_step per optimizer step (no accumulation)
            if current:
                steps.rows.append({"step_s": now - current["start"], "rollout_s": current["rollout_s"],
                                   "generation_s": current["generation_s"], "tokens": current["tokens"]})
            current.update(start=now, rollout_s=0.0, generation_s=0.0, tokens=0)
            return super().training_step(model, inputs, num_items_in_batch)

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            current["rollout_s"] += time.perf_counter() - start
            current["tokens"] += int(out["completion_mask"].sum())
            return out

        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            current["generation_s"] += time.perf_counter() - start
            return out

    completions = args.prompts * args.num_generations
    config = GRPOConfig(
        output_dir=os.path.join(args.work_dir, "trl_grpo"), num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, per_device_train_batch_size=completions,
        gradient_accumulation_steps=1, steps_per_generation=1, temperature=1.0, beta=0.0, loss_type="dapo",
        learning_rate=1e-5, max_steps=args.warmup + args.steps + 1, logging_steps=1000000, save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True, use_vllm=False)
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32)
    trainer = Timed(model=model, reward_funcs=regex_match, args=config,
                    train_dataset=load_dataset("json", data_files=paths["prompts"], split="train"),
                    processing_class=AutoTokenizer.from_pretrained(paths["tok"]))  # with the chat template
    trainer.train()
    return steps.summary(args.warmup)


def bench_grpo(args, paths: dict) -> None:
    paths = dict(paths, prompts=os.path.join(args.work_dir, "prompts.jsonl"))
    with open(paths["prompts"], "w") as f:
        for pair in preference_pairs(args.pairs, args.seed):
            f.write(json.dumps({"prompt": pair["prompt"], "pattern": REWARD_PATTERN}) + "\n")
    ours, theirs = megalm_grpo(args, paths), trl_grpo(args, paths)
    for name, r in (("megalm", ours), ("TRL GRPOTrainer", theirs)):
        print(f"GRPO {name}: step {r['step_s']:.3f}s = rollout {r['rollout_s']:.3f}s (generation "
              f"{r['generation_s']:.3f}s, {r['generated_tokens_per_s']:.0f} tok/s) + training {r['training_s']:.3f}s",
              flush=True)
    print(f"GRPO TRL / megalm: step {theirs['step_s'] / ours['step_s']:.2f}x, generation "
          f"{theirs['generation_s'] / ours['generation_s']:.2f}x, training "
          f"{theirs['training_s'] / ours['training_s']:.2f}x", flush=True)


BENCHMARKS = {"dpo": bench_dpo, "grpo": bench_grpo}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    parser.add_argument("--work-dir", default=None, help="where the tokenizer, data and checkpoints go (default: a "
                                                          "temporary directory)")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-query-groups", type=int, default=None)
    parser.add_argument("--ffn-hidden-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="grpo: prompts per step")
    parser.add_argument("--num-generations", type=int, default=8, help="grpo: completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=64, help="grpo: most new tokens")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        args.work_dir = args.work_dir or scratch
        paths = prepare(args)
        for name in args.benchmarks:
            BENCHMARKS[name](args, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
