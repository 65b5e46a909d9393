"""GRPO's reward functions: loading the ones named on the command line, calling them, and
ready-made ones.

A reward function has TRL's signature:

    def reward(prompts, completions, completion_ids, **columns) -> list[float | None]

with one entry per completion. `prompts` are the dataset's prompts as given (a string, or a list
of messages), one per completion (a prompt appears G times in a row); `completions` the decoded
completions (a string, or `[{"role": "assistant", "content": text}]` when the prompt is a list of
messages), without the stop token; `completion_ids` the generated token ids (with the stop token);
`columns` every other column of the prompts jsonl, one value per completion. None means "does not
apply to this completion": a completion for which every function returns None is left out of its
group's mean and std and gets advantage 0 (TRL's rule).

    --reward-fn megalm.posttrain.rewards:exact_match_answer   # 1 when the answer matches "answer"
    --reward-fn megalm.posttrain.rewards:think_answer_format  # 1 for <think>..</think><answer>..</answer>
    --reward-fn megalm.posttrain.rewards:regex_match          # 1 when the completion matches "pattern"
    --reward-fn path/to/reward_checkpoint                     # a reward model's score (--task reward)

A directory instead of module:function is a reward model trained with `posttrain_gpt.py --task
reward` (`RewardModel`): it scores prompt + completion, encoded with its own tokenizer and chat
template as its training pairs were, at the last token, as TRL uses a sequence-classification
model given as a reward function.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from typing import Callable, Optional, Sequence

import torch

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_ANSWER = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


class RewardError(ValueError):
    """A reward function cannot be loaded or returned something unusable; the message says which."""


def load_reward_function(name: str, device: Optional[torch.device] = None) -> Callable:
    """The function of `module:function` (--reward-fn), imported now, or the `RewardModel` of a
    checkpoint directory (on `device`)."""
    if os.path.isdir(name):
        return RewardModel(name, device or torch.device("cpu"))
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"--reward-fn {name}: cannot import {module_name} ({e}); the module must be importable "
                          f"from the working directory or PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"--reward-fn {name}: {module_name} has no function {attr}")
    return fn


def call_reward(name: str, fn: Callable, prompts: list, completions: list, completion_ids: list,
                columns: dict) -> list:
    """fn's rewards as a list of floats, NaN for None; anything else than one number or None per
    completion is an error naming the function."""
    values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
        raise RewardError(f"the reward function {name} returned {got} for {len(completions)} completions: it must "
                          f"return a list with one float (or None) per completion")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        elif hasattr(v, "__float__"):  # Python, NumPy and torch numbers
            out.append(float(v))
        else:
            raise RewardError(f"the reward function {name} returned {v!r}: rewards are floats or None")
    return out


def completion_text(completion) -> str:
    """The text of a completion, conversational (a list of messages) or not."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return completion


def extract_answer(text: str) -> str:
    """The last <answer>...</answer> of a completion where it has one, else the whole text; stripped."""
    tagged = ANSWER_TAG.findall(text)
    return (tagged[-1] if tagged else text).strip()


def exact_match_answer(prompts, completions, completion_ids, answer: Optional[list] = None, **columns) -> list:
    """1.0 where the completion's answer (`extract_answer`) equals the "answer" column, else 0.0;
    None for a prompt without an answer."""
    if answer is None:
        raise RewardError("exact_match_answer compares with an \"answer\" column: the prompts jsonl has none")
    return [None if a is None else float(extract_answer(completion_text(c)) == str(a).strip())
            for c, a in zip(completions, answer)]


def think_answer_format(prompts, completions, completion_ids, **columns) -> list:
    """1.0 where the completion is <think>...</think> then <answer>...</answer> (and nothing else)."""
    return [float(THINK_ANSWER.match(completion_text(c).strip()) is not None) for c in completions]


def regex_match(prompts, completions, completion_ids, pattern: Optional[list] = None, **columns) -> list:
    """1.0 where the whole completion matches the row's "pattern" column (a Python regex), else 0.0."""
    if pattern is None:
        raise RewardError("regex_match reads a \"pattern\" column: the prompts jsonl has none")
    return [None if p is None else float(re.fullmatch(p, completion_text(c).strip(), re.DOTALL) is not None)
            for c, p in zip(completions, pattern)]


class RewardModel:
    """A reward model checkpoint (`--task reward`: a GPT with its `score` head) as a reward function,
    frozen and in eval mode. Its tokenizer and chat template are its own (the checkpoint's)."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16):
        from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
        from megalm.data.chat import load_chat_templates, tokenizer_directory
        from megalm.data.tokenizer import build_tokenizer
        from megalm.model import GPTModel
        from megalm.posttrain.heads import add_score_head
        found = open_checkpoint(path)
        if "score.weight" not in found["model"]:
            raise RewardError(f"--reward-fn {path}: the checkpoint has no reward head (score.weight); give a model "
                              f"trained with posttrain_gpt.py --task reward, or a module:function")
        config = checkpoint_config(found)
        config.model.attention_dropout = config.model.hidden_dropout = 0.0
        model = add_score_head(GPTModel(config.model), config)
        model.load_state_dict(found["model"])
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = build_tokenizer(config.data)
        self.templates = load_chat_templates(tokenizer_directory(config.data), self.tokenizer,
                                             config.posttrain.chat_template)
        self.path, self.device, self.batch_size = path, device, batch_size
        self.__name__ = os.path.basename(os.path.normpath(path))

    def encode(self, prompt, completion) -> list:
        """prompt + completion as the reward model's training pairs were encoded (megalm.data.chat)."""
        from megalm.data.chat import encode_sample
        ids, _ = encode_sample({"prompt": prompt, "completion": completion}, self.tokenizer, self.templates,
                               f"a completion scored by {self.path}")
        return ids.tolist()

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list:
        from megalm.posttrain.preference import sequence_rewards
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = max(len(r) for r in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            documents = torch.ones(len(batch), width, dtype=torch.long)  # padding: document 1, not scored
            for k, row in enumerate(batch):
                tokens[k, :len(row)] = torch.tensor(row)
                documents[k, :len(row)] = 0
            scores += sequence_rewards(self.model, tokens.to(self.device), document_ids=documents.to(self.device),
                                       num_documents=1)[:, 0].tolist()
        return scores
