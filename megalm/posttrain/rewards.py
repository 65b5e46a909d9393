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
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Optional, Sequence

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_ANSWER = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


class RewardError(ValueError):
    """A reward function cannot be loaded or returned something unusable; the message says which."""


def load_reward_function(name: str) -> Callable:
    """The function of `module:function` (--reward-fn), imported now."""
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
