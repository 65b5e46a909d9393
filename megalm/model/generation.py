"""Autoregressive generation with a KV cache: greedy or sampled, one prompt or a batch.

Prompts of different lengths are left-padded into one batch. The cache records each row's padding,
so the model numbers every row's positions from its first real token and masks the padding keys
(`megalm.model.attention.KVCache`): each row generates what it would generate alone. The prompt is
run once (prefill) and each new token is one forward step of one position; only the last
position's logits are computed.

The next-token distribution is processed in Hugging Face's order: repetition penalty (CTRL,
Keskar et al. 2019: a logit of an already seen token is divided by the penalty when positive and
multiplied by it when negative), temperature, top-k, then top-p (nucleus: the smallest set of most
likely tokens whose probability reaches p). Temperature 0 means greedy decoding. Sampling draws
from a `torch.Generator` seeded with `seed`, so a run is reproducible.

A row stops at a stop token (the tokenizer's end-of-document and any ids given), when its text
contains a stop string (the text is cut before it), or after `max_new_tokens`.

A prompt plus its new tokens longer than the model's positions is refused with learned positions
and warned about with RoPE (`megalm.model.context`).

Under tensor parallelism every rank runs `generate` on its shard of the model with the same prompts
and the same `seed`: the cache holds the rank's query groups, the logits are gathered over the
vocabulary slices (the same values on every rank), so every rank draws the same tokens. Pipeline
and sequence parallelism are not supported here.

This is the model-level core (post-training samples rollouts with it); `megalm.inference.generate`
re-exports it for the tools and adds streaming.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from megalm.model.attention import KVCache
from megalm.model.context import check_context_length
from megalm.parallel import mappings
from megalm.parallel.tensor import vocab_parallel_logits


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must not be negative, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    tokens: list = field(default_factory=list)  # new tokens, without the stop token
    text: Optional[str] = None  # decoded and cut before a stop string, when a decoder was given
    finish_reason: str = "length"  # "length", "stop_token" or "stop_string"
    stop_token: Optional[int] = None  # the stop token that ended the row (finish_reason "stop_token")


def process_logits(logits: Tensor, params: SamplingParams, seen: Optional[Tensor] = None) -> Tensor:
    """Repetition penalty, temperature, top-k and top-p on logits [b, V] (fp32); `seen` [b, V] bool
    marks the tokens each row has seen so far (prompt included)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * params.repetition_penalty, logits / params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> Tensor:
    """[b, V] processed logits -> [b] token ids."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _tensor_parallel_group(model):
    """The model's tensor-parallel group, None without tensor parallelism; refuses the layouts
    generation does not support."""
    parallel = getattr(model, "parallel", None)
    if parallel is None or parallel.tensor_model_parallel_size == 1 and parallel.pipeline_model_parallel_size == 1:
        return None
    if parallel.pipeline_model_parallel_size > 1 or parallel.sequence_parallel:
        raise ValueError("generation runs on a whole model or a tensor-parallel shard of it: no pipeline or "
                         "sequence parallelism (--pipeline-model-parallel-size 1, no --sequence-parallel)")
    return parallel.tensor_model_parallel_group


def _last_logits(model, tokens: Tensor, cache: KVCache, vocab_size: int, group=None) -> Tensor:
    """One forward step; fp32 logits of each row's last position, [b, vocab_size] (gathered over
    the tensor-parallel vocabulary slices when `group` is given)."""
    h = model.hidden_states(tokens, cache)[:, -1]  # [b, h]
    logits = vocab_parallel_logits(h, model.output_weight)
    if group is not None:
        logits = mappings.gather_from_tensor_parallel_region(logits, group)
    return logits[:, :vocab_size].float()


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: Optional[int] = None,
             eod: Optional[int] = None, decode: Optional[Callable[[list], str]] = None,
             on_token: Optional[Callable[[int, int], None]] = None) -> list:
    """Continue each prompt (a list of token ids); returns one `Generation` per prompt.

    vocab_size: the true vocabulary (logits of the padding rows are never chosen);
    eod: a stop token besides params.stop_token_ids; decode: ids -> text, needed for stop strings
    and to fill `Generation.text`; on_token(row, token): called with every new token as it comes
    (a stop token is not passed).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if params.stop_strings and decode is None:
        raise ValueError("stop strings need a decoder (decode=tokenizer.decode)")
    config = model.config
    vocab_size = vocab_size or config.padded_vocab_size
    group = _tensor_parallel_group(model)
    tp = 1 if group is None else model.parallel.tensor_model_parallel_size
    weight = next(model.parameters())
    device = weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    room = config.max_positions - longest
    warning = check_context_length(
        config, total, f"a prompt of {longest} tokens plus {params.max_new_tokens} new tokens",
        f"ask for at most {room} new tokens or shorten the prompt" if room > 0 else
        f"shorten the prompt to fewer than {config.max_positions} tokens")
    if warning is not None:
        warnings.warn(warning, stacklevel=3)

    padding = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    cache = KVCache(config, b, max(total, 1), device=device, dtype=weight.dtype, tensor_parallel_size=tp)
    if padding.any():
        cache.set_left_padding(padding)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(list(p), device=device)] = True
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        if params.seed is None and group is not None:
            raise ValueError("sampling on a tensor-parallel model needs a seed (the same on every rank)")
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    stop_ids = set(params.stop_token_ids) | ({eod} if eod is not None else set())

    results = [Generation() for _ in prompts]
    finished = [False] * b
    if params.max_new_tokens > 0:
        logits = _last_logits(model, tokens, cache, vocab_size, group)
    for step in range(params.max_new_tokens):
        chosen = next_tokens(process_logits(logits, params, seen), params, generator)
        if seen is not None:
            seen[torch.arange(b, device=device), chosen] = True
        for i, token in enumerate(chosen.tolist()):
            if finished[i]:
                continue
            if token in stop_ids:
                finished[i], results[i].finish_reason, results[i].stop_token = True, "stop_token", token
                continue
            results[i].tokens.append(token)
            if on_token is not None:
                on_token(i, token)
            if params.stop_strings and any(s in decode(results[i].tokens) for s in params.stop_strings):
                finished[i], results[i].finish_reason = True, "stop_string"
        if all(finished) or step == params.max_new_tokens - 1:
            break
        logits = _last_logits(model, chosen[:, None], cache, vocab_size, group)

    if decode is not None:
        for r in results:
            r.text = decode(r.tokens)
            cuts = [r.text.find(s) for s in params.stop_strings if s in r.text]
            if cuts:
                r.text = r.text[:min(cuts)]
    return results
