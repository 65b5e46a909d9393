"""GRPO (Shao et al. 2024, DeepSeekMath; DeepSeek-R1): the policy learns from rewards of its own
samples, each compared with the other samples of the same prompt.

One rollout: each prompt of the batch is continued G times (`--num-generations`) by the policy as it
is now, in this process, with megalm's KV-cache generation (`megalm.model.generation`: batched,
temperature / top-p / top-k, at most `--max-completion-length` new tokens, stopping at the
tokenizer's end-of-document or end-of-turn token). The reward functions score every completion
(`megalm.posttrain.rewards`), and the weighted sum r of their scores becomes an advantage relative to
the prompt's group, exactly as TRL 1.16's GRPOTrainer computes it:

    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)       --scale-rewards group (default)
    A_i = (r_i - mean_group(r)) / (std_batch(r) + 1e-4)       --scale-rewards batch
    A_i =  r_i - mean_group(r)                                --scale-rewards none

with the unbiased std; a completion every function scored None is left out of the statistics and
gets A = 0. The loss on each completion token t, with the probability ratio rho = pi / pi_old,

    l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL_t,
    KL_t = exp(ref - logp) - (ref - logp) - 1                 (k3, Schulman 2020)

is averaged as `--loss-type` says (TRL's definitions): grpo, each sequence's mean then the mean over
sequences; bnpo, over the micro-batch's tokens; dr_grpo, the sum over the micro-batch divided by
rows x --max-completion-length; dapo, over all the tokens of the global batch. Log-probabilities are
taken at the sampling temperature, as TRL does.

A batch of rollouts serves `--num-iterations` (mu) optimizer steps: pi_old is the policy that
sampled them (its log-probabilities kept from the rollout; with mu = 1 it is the current policy
and rho = 1). One iteration is one optimizer step on `--global-batch-size` completions (=
prompts x G), so rollouts are generated every mu iterations. The reference log-probabilities come
from `megalm.posttrain.reference` (the LoRA base with adapters disabled, or a co-hosted copy of the
starting checkpoint) and are computed once per rollout; with beta 0 there is no reference at all.

Parallelism: each data-parallel rank samples its own prompts (whole groups), rewards are gathered
over the ranks for the advantages. Under tensor parallelism every rank of a group samples on its
shard with the same seed and draws the same tokens. Pipeline and sequence parallelism are refused.
Rollout r samples prompts [r P, (r + 1) P) of an order shuffled each epoch by --seed, with a
generator seeded by (--seed, r, data-parallel rank): a run resumed from a checkpoint taken at a
rollout boundary (every iteration that is a multiple of mu; --save-interval is checked for it)
samples exactly what the uninterrupted run samples.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from megalm.config import Config, ConfigError
from megalm.data.errors import DataError
from megalm.data.tokenizer.base import EOD_TOKENS
from megalm.model.generation import SamplingParams, generate
from megalm.model.moe import moe_aux_loss
from megalm.posttrain.logprobs import IGNORE_INDEX, token_entropy, token_logprobs, unwrap, vocab_logits
from megalm.posttrain.rewards import call_reward, load_reward_function
from megalm.training.trainer import Trainer

STD_EPS = 1e-4  # TRL's: A = (r - mean) / (std + 1e-4)


# ------------------------------------------------------------------------------------------ prompts

class PromptDataset:
    """The prompts of jsonl files: {"prompt": "text" or [messages], <other columns>} per line.

    A list of messages is rendered with the chat template and its generation prompt; a string is
    encoded as it is. Every other column is passed to the reward functions."""

    def __init__(self, paths: list, tokenizer, templates: dict, max_prompt_length: int):
        from megalm.data.chat import _check_messages, select_template
        self.tokenizer = tokenizer
        self.records, self.ids = [], []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path} line {line_no}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where} is not JSON ({e.msg})") from None
                    if not isinstance(record, dict) or "prompt" not in record:
                        raise DataError(f"{where}: a GRPO prompt is an object with a \"prompt\" (a string or a "
                                        f"list of messages)")
                    prompt = record["prompt"]
                    if isinstance(prompt, list):
                        messages = _check_messages(prompt, where, "prompt")
                        text = select_template(templates, record.get("tools")).render(
                            messages, record.get("tools"), add_generation_prompt=True, where=where)
                    elif isinstance(prompt, str) and prompt:
                        text = prompt
                    else:
                        raise DataError(f"{where}: \"prompt\" should be a non-empty string or a list of messages")
                    ids = tokenizer.encode(text)
                    if not ids or len(ids) > max_prompt_length:
                        raise DataError(f"{where}: the prompt has {len(ids)} tokens; with --max-completion-length "
                                        f"new tokens a prompt may have 1 to {max_prompt_length} (raise "
                                        f"--seq-length or shorten the prompt)")
                    self.records.append(record)
                    self.ids.append(ids)
        if not self.records:
            raise DataError(f"{', '.join(paths)}: no prompts")

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.RandomState((seed * 7919 + epoch) % 2**32).permutation(len(self))

    def positions(self, start: int, count: int, seed: int) -> list:
        """The prompt indices at positions [start, start + count) of the epoch-shuffled stream."""
        out, n, orders = [], len(self), {}
        for q in range(start, start + count):
            epoch = q // n
            if epoch not in orders:
                orders[epoch] = self.order(epoch, seed)
            out.append(int(orders[epoch][q % n]))
        return out


def stop_token_ids(tokenizer) -> list:
    """The ids that end a completion: the end-of-document token and every other end-of-document /
    end-of-turn token of `EOD_TOKENS` (<|im_end|>, </s>, ...) that is one token of this vocabulary."""
    ids = {tokenizer.eod} if tokenizer.eod is not None else set()
    for text in EOD_TOKENS:
        encoded = tokenizer.encode(text)
        if len(encoded) == 1 and tokenizer.decode(encoded) == text:
            ids.add(encoded[0])
    return sorted(ids)


# ------------------------------------------------------------------------------------------ the math

def nanstd(x: Tensor, dim: Optional[int] = None) -> Tensor:
    """Unbiased std ignoring NaN (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, math.nan))
    return var.sqrt() if dim is None else var.sqrt().squeeze(dim)


def group_advantages(rewards_per_func: Tensor, weights: Tensor, num_generations: int, scale: str) -> tuple:
    """(advantages [N], rewards [N], std [N]) of rewards [N, F] (NaN where a function gave None) for
    N completions in groups of `num_generations` consecutive ones (TRL's sum_then_normalize)."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None]).nansum(dim=1)
    rewards[unscorable] = math.nan
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        std = nanstd(rewards).reshape(()).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), rewards, std


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, loss_type: str,
              epsilon_low: float, epsilon_high: float, beta: float = 0.0, ref_logps: Optional[Tensor] = None,
              max_completion_length: Optional[int] = None, normalizer: Optional[Tensor] = None) -> tuple:
    """(loss, per-token loss [B, T], per-token KL or None, ratio [B, T]) of one micro-batch.

    logps / old_logps / ref_logps [B, T] of the completion tokens, mask [B, T] (1 on completion
    tokens), advantages [B]. The loss is TRL's for one micro-batch before its division by the
    gradient accumulation steps; dapo divides the token sum by `normalizer` (TRL: the global batch's
    completion tokens / processes)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = masked.sum() / normalizer.clamp(min=1.0)
    else:
        raise ValueError(f"unknown GRPO loss type {loss_type}")
    return loss, per_token, kl, ratio


# ------------------------------------------------------------------------------------------ trainer

# Per-token statistics summed over an interval: tokens, entropy, KL, low / high / any clipping.
TOKEN_STATS = ("tokens", "entropy", "kl", "clip_low", "clip_high", "clip")


class GRPOTrainer(Trainer):
    """The trainer's loop with rollouts for micro-batches and the GRPO loss for forward step."""

    def __init__(self, config: Config, model_provider, datasets_provider, forward_step=None, state=None,
                 log_stream=None, reference_path: Optional[str] = None):
        p = config.posttrain
        self.grpo = p
        self.beta = p.beta or 0.0
        self.epsilon_high = p.epsilon if p.epsilon_high is None else p.epsilon_high
        self.reward_names = list(p.reward_fn)
        self.reward_weights = torch.tensor([float(w) for w in p.reward_weights] or [1.0] * len(self.reward_names))
        self.reference = None
        if self.beta:
            from megalm.posttrain.reference import ReferencePolicy
            self.reference = ReferencePolicy(reference_path)
        self._reset_stats()
        super().__init__(config, model_provider, datasets_provider, self.loss_step, state, log_stream)

    def _build(self, model_provider, datasets_provider, forward_step) -> None:
        self._check_layout()
        super()._build(model_provider, datasets_provider, forward_step)
        self.reward_fns = [load_reward_function(name, self.state.device) for name in self.reward_names]
        self.prompts = self.datasets[0]
        self.stop_ids = stop_token_ids(self.prompts.tokenizer)

    def _check_layout(self) -> None:
        st, t, p = self.state, self.config.train, self.grpo
        per_rank = t.global_batch_size // st.data_parallel_size
        if per_rank % p.num_generations:
            raise ConfigError(f"--global-batch-size {t.global_batch_size} counts completions: each of the "
                              f"{st.data_parallel_size} data-parallel rank(s) takes whole groups of "
                              f"--num-generations {p.num_generations}, so it must be a multiple of "
                              f"{p.num_generations * st.data_parallel_size}")

    # -- rollouts

    def data_iterator(self, dataset, consumed_samples: int) -> Iterator[dict]:
        """The micro-batches of rollout after rollout: each batch of rollouts serves mu iterations."""
        mu, iteration = self.grpo.num_iterations, consumed_samples // self.config.train.global_batch_size
        rollout, done = divmod(iteration, mu)
        if done:
            self.log.print(f"note: resuming inside a batch of rollouts (iteration {iteration}, --num-iterations "
                           f"{mu}): its {mu - done} remaining step(s) use rollouts sampled again by the current "
                           f"policy")
        while True:
            micro_batches = self.rollout(rollout)
            for _ in range(mu - done):
                yield from micro_batches
            rollout, done = rollout + 1, 0

    @torch.no_grad()
    def rollout(self, index: int) -> list:
        """Sample, score and prepare this rank's micro-batches of rollout `index`."""
        st, t, p = self.state, self.config.train, self.grpo
        start = time.perf_counter()
        per_rank = t.global_batch_size // st.data_parallel_size // p.num_generations
        first = (index * st.data_parallel_size + st.data_parallel_rank) * per_rank
        chosen = self.prompts.positions(first, per_rank, t.seed)
        records = [self.prompts.records[i] for i in chosen for _ in range(p.num_generations)]
        prompt_ids = [self.prompts.ids[i] for i in chosen for _ in range(p.num_generations)]
        params = SamplingParams(max_new_tokens=p.max_completion_length, temperature=p.temperature, top_k=p.top_k,
                                top_p=p.top_p, seed=(t.seed * 1_000_003 + index) * 1009 + st.data_parallel_rank,
                                stop_token_ids=self.stop_ids)
        for chunk in self.chunks:
            chunk.eval()
        generations = self.sample(prompt_ids, params)
        generated = time.perf_counter()
        completion_ids = [g.tokens + ([g.stop_token] if g.stop_token is not None else []) for g in generations]
        advantages = self._score(records, generations, completion_ids)
        batches = self._micro_batches(prompt_ids, completion_ids, advantages)
        for chunk in self.chunks:
            chunk.train()
        self.stats["generation_s"] += generated - start
        self.stats["rollout_s"] += time.perf_counter() - start
        self.stats["generated_tokens"] += sum(len(c) for c in completion_ids)
        return batches

    def sample(self, prompt_ids: list, params: SamplingParams) -> list:
        """One `Generation` per prompt, by the policy as it is now (the chunk of this rank)."""
        return generate(self.chunks[0], prompt_ids, params, vocab_size=self.config.model.vocab_size)

    def _score(self, records: list, generations: list, completion_ids: list) -> Tensor:
        """This rank's advantages [N]; the rewards of all ranks enter the statistics."""
        st, p = self.state, self.grpo
        decode = self.prompts.tokenizer.decode
        texts = [decode(g.tokens) for g in generations]
        prompts = [r["prompt"] for r in records]
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                       for prompt, text in zip(prompts, texts)]
        columns = {key: [r.get(key) for r in records] for key in {k for r in records for k in r} - {"prompt"}}
        local = torch.tensor([call_reward(name, fn, prompts, completions, completion_ids, columns)
                              for name, fn in zip(self.reward_names, self.reward_fns)], dtype=torch.float32).T
        lengths = torch.tensor([[len(c), float(g.finish_reason == "stop_token")]
                                for c, g in zip(completion_ids, generations)], dtype=torch.float32)
        everything = self._gather_dp(torch.cat([local, lengths], dim=1))
        rewards_per_func, lengths = everything[:, :-2], everything[:, -2:]
        advantages, rewards, std = group_advantages(rewards_per_func, self.reward_weights, p.num_generations,
                                                    p.scale_rewards)
        n = len(records)
        mine = slice(st.data_parallel_rank * n, (st.data_parallel_rank + 1) * n)
        self._record_rollout(rewards_per_func, rewards, std, lengths)
        return advantages[mine]

    def _gather_dp(self, x: Tensor) -> Tensor:
        st = self.state
        if st.data_parallel_size == 1:
            return x
        x = x.to(st.device) if st.backend == "nccl" else x
        parts = [torch.empty_like(x) for _ in range(st.data_parallel_size)]
        dist.all_gather(parts, x, group=st.data_parallel_group)
        return torch.cat([part.cpu() for part in parts])

    def _micro_batches(self, prompt_ids: list, completion_ids: list, advantages: Tensor) -> list:
        """Rows prompt + completion (right-padded per micro-batch; labels on the completion tokens,
        the stop token included), with their advantages and, where needed, the old policy's and the
        reference's log-probabilities."""
        st, t = self.state, self.config.train
        mbs, device = t.micro_batch_size, st.device
        tokens_here = torch.tensor(float(sum(len(c) for c in completion_ids)))
        total_tokens = self._gather_dp(tokens_here.reshape(1)).sum()
        batches = []
        for s in range(0, len(prompt_ids), mbs):
            rows = [(prompt_ids[i] + completion_ids[i], len(prompt_ids[i])) for i in range(s, s + mbs)]
            width = max(len(r) for r, _ in rows) - 1
            tokens = torch.zeros(mbs, width, dtype=torch.long)
            labels = torch.full((mbs, width), IGNORE_INDEX, dtype=torch.long)
            for k, (row, prompt_len) in enumerate(rows):
                tokens[k, :len(row) - 1] = torch.tensor(row[:-1])
                labels[k, prompt_len - 1:len(row) - 1] = torch.tensor(row[prompt_len:])
            batch = {"tokens": tokens, "labels": labels, "advantages": advantages[s:s + mbs],
                     # dapo: a micro-batch's share of the global batch's token mean, undone from the
                     # trainer's division by the accumulation steps
                     "dapo_normalizer": total_tokens / (st.data_parallel_size * self.num_microbatches),
                     "row_tokens": torch.tensor(sum(len(r) - 1 for r, _ in rows))}
            inputs = {"tokens": tokens.to(device), "labels": labels.to(device)}
            if self.grpo.num_iterations > 1:
                batch["old_logps"] = self._logps(self.chunks[0], inputs).cpu()
            if self.reference is not None:
                batch["ref_logps"] = self.reference.token_logprobs(self.chunks[0], inputs,
                                                                   self.grpo.temperature).cpu()
            batches.append(batch)
        return batches

    def _logps(self, model, inputs: dict, entropy: bool = False):
        logits, vocab_start, group = vocab_logits(model, inputs["tokens"])
        logps = token_logprobs(logits, inputs["labels"], vocab_start, group, self.grpo.temperature)
        if not entropy:
            return logps
        return logps, token_entropy(logits, group, self.grpo.temperature)

    # -- the loss

    def loss_step(self, batch: dict, model: torch.nn.Module) -> Tensor:
        """The GRPO loss of one micro-batch of rollouts (the trainer's forward step)."""
        p, device = self.grpo, self.state.device
        inputs = {"tokens": batch["tokens"].to(device), "labels": batch["labels"].to(device)}
        logps, entropy = self._logps(model, inputs, entropy=True)
        mask = inputs["labels"] != IGNORE_INDEX
        old = batch["old_logps"].to(device) if "old_logps" in batch else logps.detach()
        ref = batch["ref_logps"].to(device) if "ref_logps" in batch else None
        advantages = batch["advantages"].to(device)
        loss, _, kl, ratio = grpo_loss(logps, old, advantages, mask, p.loss_type, p.epsilon, self.epsilon_high,
                                       self.beta, ref, p.max_completion_length,
                                       batch["dapo_normalizer"].to(device))
        with torch.no_grad():
            adv = advantages[:, None]
            low = (ratio < 1 - p.epsilon) & (adv < 0) & mask
            high = (ratio > 1 + self.epsilon_high) & (adv > 0) & mask
            values = [mask.sum(), (entropy * mask).sum(), (kl * mask).sum() if kl is not None else 0.0,
                      low.sum(), high.sum(), (low | high).sum()]
            self.token_stats += torch.tensor([float(v) for v in values])
            self.stats["trained_tokens"] += int(batch["row_tokens"])
        aux = moe_aux_loss(unwrap(model))  # MoE policies: their balancing losses too
        return loss if aux is None else loss + aux

    # -- logging

    def _reset_stats(self) -> None:
        self.stats = {"generation_s": 0.0, "rollout_s": 0.0, "generated_tokens": 0, "trained_tokens": 0}
        self.rollout_stats: list = []
        self.token_stats = torch.zeros(len(TOKEN_STATS), dtype=torch.float64)

    def _record_rollout(self, rewards_per_func: Tensor, rewards: Tensor, std: Tensor, lengths: Tensor) -> None:
        row = {}
        for name, column in zip(self.reward_names, rewards_per_func.T):
            short = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name.rsplit(":", 1)[1]
            row[f"rewards/{short}/mean"] = torch.nanmean(column).item()
            row[f"rewards/{short}/std"] = nanstd(column).item()
        row["reward"] = torch.nanmean(rewards).item()
        row["reward_std"] = nanstd(rewards).item()
        row["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
        row["completion_length"] = lengths[:, 0].mean().item()
        row["completion_length_max"] = lengths[:, 0].max().item()
        row["terminated_fraction"] = lengths[:, 1].mean().item()
        self.rollout_stats.append(row)

    def grpo_metrics(self, elapsed: float) -> dict:
        """The interval's GRPO metrics (rollouts averaged; token statistics over all ranks)."""
        st = self.state
        sums = torch.cat([self.token_stats, torch.tensor([float(self.stats["generated_tokens"]),
                                                          float(self.stats["trained_tokens"])], dtype=torch.float64)])
        if st.data_parallel_size > 1:
            sums = sums.to(st.device)
            dist.all_reduce(sums, group=st.data_parallel_group)
            sums = sums.cpu()
        tokens = max(sums[0].item(), 1.0)
        out = {}
        if self.rollout_stats:
            for key in self.rollout_stats[0]:
                out[key] = sum(r[key] for r in self.rollout_stats) / len(self.rollout_stats)
        out["entropy"] = sums[1].item() / tokens
        if self.beta:
            out["kl"] = sums[2].item() / tokens
        out["clip_ratio/low_mean"] = sums[3].item() / tokens
        out["clip_ratio/high_mean"] = sums[4].item() / tokens
        out["clip_ratio/region_mean"] = sums[5].item() / tokens
        gen_s = self.stats["generation_s"]
        train_s = max(elapsed - self.stats["rollout_s"], 1e-9)
        out["generation_s"], out["training_s"] = gen_s, train_s
        out["generation_tokens_per_s"] = sums[6].item() / gen_s if gen_s else float("nan")
        out["training_tokens_per_s"] = sums[7].item() / train_s
        return out

    def _log_interval(self, timer, mean_loss, lr, grad_norm, skipped, elapsed, eta) -> None:
        interval = timer.elapsed()
        super()._log_interval(timer, mean_loss, lr, grad_norm, skipped, elapsed, eta)
        metrics = self.grpo_metrics(interval)
        parts = [f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("generation_s", "training_s")]
        parts.append(f"generation {metrics['generation_s']:.2f}s / training {metrics['training_s']:.2f}s")
        self.log.print(f"grpo {self.train_state.iteration} | " + " | ".join(parts))
        self.log.scalars({f"grpo/{k}": v for k, v in metrics.items()}, self.train_state.iteration)
        self._reset_stats()


def check_grpo(config: Config) -> None:
    """Start-up checks that need the whole configuration; the reward functions are imported here."""
    p, t = config.posttrain, config.train
    if config.parallel.pipeline_model_parallel_size > 1 or config.parallel.sequence_parallel:
        raise ConfigError("--task grpo generates its rollouts on the training model: it runs with tensor and "
                          "data parallelism only (--pipeline-model-parallel-size 1, no --sequence-parallel)")
    mu = p.num_iterations
    for flag, value in (("--save-interval", t.save_interval), ("--exit-interval", t.exit_interval)):
        if value and value % mu:
            raise ConfigError(f"{flag} {value} must be a multiple of --num-iterations {mu}: a checkpoint is taken "
                              f"between two batches of rollouts, so that a resumed run samples what this one would")
    if t.micro_batch_size > t.global_batch_size:
        raise ConfigError(f"--micro-batch-size {t.micro_batch_size} is larger than --global-batch-size "
                          f"{t.global_batch_size} (completions per step)")
    if config.model.seq_length <= p.max_completion_length:
        raise ConfigError(f"--seq-length {config.model.seq_length} leaves no room for a prompt before "
                          f"--max-completion-length {p.max_completion_length} new tokens")
    for name in p.reward_fn:
        if os.path.isdir(name):  # a reward model, loaded with the policy
            continue
        if name.count(":") != 1 or not all(name.split(":")):
            raise ConfigError(f"--reward-fn {name}: expected MODULE:FUNCTION or a reward model's checkpoint directory")
        load_reward_function(name)


def build_prompt_dataset(config: Config, tokenizer=None) -> PromptDataset:
    from megalm.data.chat import load_chat_templates, tokenizer_directory
    from megalm.data.tokenizer import build_tokenizer
    paths = [str(path) for path in config.data.data_path or []]
    if not paths:
        raise DataError("--data-path is empty: give jsonl files of GRPO prompts")
    tokenizer = tokenizer or build_tokenizer(config.data)
    templates = load_chat_templates(tokenizer_directory(config.data), tokenizer, config.posttrain.chat_template)
    return PromptDataset(paths, tokenizer, templates, config.model.seq_length - config.posttrain.max_completion_length)
