"""Evaluation of a language model: perplexity and multiple-choice log-likelihood.

Perplexity follows Hugging Face's "perplexity of fixed-length models" with a sliding window of
`seq_length` tokens moved by `stride` (< seq_length): window k reads tokens [k * stride,
k * stride + seq_length) and scores only the tokens after the previous window's end, so every
token but the first is scored exactly once, with at least seq_length - stride tokens of context
(the first window scores all of its tokens). perplexity = exp(mean negative log-likelihood).

Multiple choice (HellaSwag, ARC, PIQA style): each example is {"context": str, "choices": [str],
"answer": int}; a choice's score is the summed log-probability of its tokens after the context.
As in lm-evaluation-harness, the context and the continuation are tokenized together and split
where the context's own tokens end (a trailing space of the context moves to the continuation).
acc picks the highest score; acc_norm the highest score divided by the choice's length in
characters (lm-eval's acc_norm).

Probabilities are over the true vocabulary: the rows megalm adds to pad it (Megatron's
--make-vocab-size-divisible-by) take no part, as in the exported Hugging Face model.

Batches of sequences of different lengths are right-padded: with causal attention no real token
sees a padding token, so no mask is needed.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from tqdm import tqdm

from megalm.parallel.tensor import vocab_parallel_logits


def sliding_windows(num_tokens: int, seq_length: int, stride: int) -> list:
    """(begin, end, first scored index) of each window over num_tokens tokens."""
    if not 0 < stride < seq_length:
        raise ValueError(f"stride must be in [1, seq-length) = [1, {seq_length}), got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def token_logprobs(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(tokens[:, t + 1] | tokens[:, :t + 1]) for t < s - 1: [b, s - 1] fp32."""
    h = model.hidden_states(tokens)
    logits = vocab_parallel_logits(h[:, :-1], model.output_weight)[..., :vocab_size].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokens: Sequence[int], seq_length: int, stride: int, vocab_size: int,
               batch_size: int = 1, progress: bool = True) -> dict:
    """Sliding-window perplexity of one token stream (see the module docstring)."""
    total, count = stream_nll(model, tokens, seq_length, stride, vocab_size, batch_size, progress)
    nll = total / count
    return {"task": "perplexity", "tokens": count, "nll": nll, "perplexity": math.exp(nll),
            "seq_length": seq_length, "stride": stride}


@torch.no_grad()
def stream_nll(model, tokens: Sequence[int], seq_length: int, stride: int, vocab_size: int,
               batch_size: int = 1, progress: bool = True) -> tuple:
    """(summed negative log-likelihood, tokens scored) of a stream, scored by sliding windows."""
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    stream = torch.as_tensor(list(tokens), dtype=torch.long)
    windows = sliding_windows(len(stream), seq_length, stride)
    total, count = 0.0, 0
    bar = tqdm(total=len(stream) - 1, desc="perplexity", unit="tok", disable=not progress)
    # Windows of the same length run together (all but the last are seq_length long).
    for length in sorted({end - begin for begin, end, _ in windows}, reverse=True):
        group = [w for w in windows if w[1] - w[0] == length]
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            batch = torch.stack([stream[b:e] for b, e, _ in chunk]).to(_device(model))
            logprobs = token_logprobs(model, batch, vocab_size)  # [n, length - 1]
            for row, (begin, end, first) in enumerate(chunk):
                scored = logprobs[row, first - begin - 1:]
                total -= scored.double().sum().item()
                count += scored.numel()
                bar.update(scored.numel())
    bar.close()
    return total, count


def encode_pair(encode: Callable[[str], list], context: str, continuation: str):
    """(context ids, continuation ids) the lm-evaluation-harness way."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return whole[:len(context_ids)], whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence, vocab_size: int, max_length: int, batch_size: int = 8,
                   progress: bool = True, desc: str = "loglikelihood") -> list:
    """For each (context ids, continuation ids): (summed log-probability of the continuation,
    whether greedy decoding would produce it). The model reads at most max_length tokens: longer
    inputs lose their oldest tokens."""
    results = [None] * len(pairs)
    items = []
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"request {index} has an empty continuation")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        items.append((index, whole, len(continuation)))
    items.sort(key=lambda item: -len(item[1]))  # similar lengths together: less padding
    device = _device(model)
    for i in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
        chunk = items[i:i + batch_size]
        longest = max(len(whole) for _, whole, _ in chunk)
        batch = torch.zeros(len(chunk), longest, dtype=torch.long)
        for row, (_, whole, _) in enumerate(chunk):
            batch[row, :len(whole)] = torch.as_tensor(whole)
        batch = batch.to(device)
        h = model.hidden_states(batch[:, :-1])  # [b, s - 1, h]: the last token is only ever a target
        for row, (index, whole, n) in enumerate(chunk):
            # Only the positions that predict the continuation need the [tokens x vocab] logits.
            positions = torch.arange(len(whole) - 1 - n, len(whole) - 1, device=device)
            logits = vocab_parallel_logits(h[row, positions], model.output_weight)[:, :vocab_size].float()
            logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
            targets = batch[row, positions + 1]
            scores = logprobs.gather(-1, targets[:, None]).squeeze(-1)
            greedy = bool((logprobs.argmax(dim=-1) == targets).all())
            results[index] = (scores.double().sum().item(), greedy)
    return results


def read_multiple_choice(path: str) -> list:
    examples = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
            if not isinstance(ex, dict) or not all(k in ex for k in ("context", "choices", "answer")):
                raise ValueError(f"{path}:{line_number}: expected an object with context, choices and answer")
            if not isinstance(ex["choices"], list) or not 0 <= int(ex["answer"]) < len(ex["choices"]):
                raise ValueError(f"{path}:{line_number}: answer {ex['answer']} is not an index into choices")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def multiple_choice(model, encode: Callable[[str], list], examples: Iterable[dict], vocab_size: int,
                    max_length: int, batch_size: int = 8, progress: bool = True) -> dict:
    examples = list(examples)
    pairs, owners = [], []
    for e, ex in enumerate(examples):
        for choice in ex["choices"]:
            pairs.append(encode_pair(encode, ex["context"], choice))
            owners.append(e)
    scores = loglikelihoods(model, pairs, vocab_size, max_length, batch_size, progress, desc="multiple-choice")
    correct = correct_norm = 0
    position = 0
    for ex in examples:
        n = len(ex["choices"])
        ll = [s for s, _ in scores[position:position + n]]
        position += n
        normalised = [s / max(len(c), 1) for s, c in zip(ll, ex["choices"])]
        correct += int(max(range(n), key=ll.__getitem__) == int(ex["answer"]))
        correct_norm += int(max(range(n), key=normalised.__getitem__) == int(ex["answer"]))
    return {"task": "multiple-choice", "examples": len(examples), "acc": correct / len(examples),
            "acc_norm": correct_norm / len(examples)}


def read_tokens(path: str, encode: Optional[Callable[[str], list]], max_tokens: Optional[int] = None) -> list:
    """The token stream of a text file, or of an indexed dataset prefix (PREFIX.bin / PREFIX.idx,
    documents one after the other), cut to max_tokens."""
    from megalm.data.indexed_dataset import IndexedDataset, dataset_exists
    if dataset_exists(path):
        dataset = IndexedDataset(path)
        tokens = []
        for i in range(len(dataset)):
            tokens.extend(int(t) for t in dataset[i])
            if max_tokens is not None and len(tokens) >= max_tokens:
                break
        dataset.close()
    else:
        if encode is None:
            raise ValueError("a text input needs the checkpoint's tokenizer, and it has none")
        with open(path, encoding="utf-8") as f:
            tokens = encode(f.read())
    return tokens[:max_tokens] if max_tokens is not None else tokens
