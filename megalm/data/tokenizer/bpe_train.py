"""MegaBPE training: learn byte-level BPE merges from a corpus.

1. Pre-tokenise every document with the split regex (GPT-2 / GPT-4 style) and count the unique
   pre-token words (in parallel over documents with `workers` processes).
2. Learn merges on those unique words with their counts (`train_merges`): the C++ loop in
   `csrc/bpe.cpp` when it can be loaded, else the Python loop below, which implements the same
   algorithm with the same tie-breaking and so gives the same merges.
3. Build the tokenizer: 256 byte tokens (id = byte value), one token per merge, then the special
   tokens.

Merges never cross pre-token boundaries, so the regex decides, for example, that a word never
merges with the space after it.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable, Optional, Sequence

import regex

from megalm.data import _native
from megalm.data.errors import DataError
from megalm.data.tokenizer.bpe import ByteLevelBPETokenizer, resolve_pattern
from megalm.data.workers import ordered_map, worker_pool

MIN_FREQUENCY = 2


def count_words(texts: Iterable[str], pattern: str, workers: int = 1,
                chunk_chars: int = 1 << 21, progress=None) -> Counter:
    """Counts of the pre-token words of `texts` under `pattern`.

    `progress`, if given, is called with the number of characters of each finished chunk.
    """
    counts: Counter = Counter()
    with worker_pool(workers) as pool:
        for chunk_counts, size in ordered_map(pool, _count_chunk, ((pattern, c) for c in _chunks(texts, chunk_chars))):
            counts.update(chunk_counts)
            if progress:
                progress(size)
    return counts


def _chunks(texts: Iterable[str], chunk_chars: int):
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _count_chunk(args) -> tuple[Counter, int]:
    """(word counts, characters) of a chunk of texts."""
    pattern, texts = args
    split = regex.compile(pattern).findall
    counts: Counter = Counter()
    for text in texts:
        counts.update(split(text))
    return counts, sum(map(len, texts))


def train_merges(word_counts: dict, num_merges: int, min_frequency: int = MIN_FREQUENCY,
                 use_native: Optional[bool] = None) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges; merge i creates token 256 + i.

    `word_counts` maps each unique word (str or bytes) to its count. Stops early when the best
    pair occurs fewer than `min_frequency` times. `use_native` forces (True) or forbids (False)
    the C++ loop; by default it is used when available.
    """
    words = [w.encode("utf-8") if isinstance(w, str) else bytes(w) for w in word_counts]
    counts = [int(c) for c in word_counts.values()]
    native = _native.load("bpe") if use_native is not False else None
    if use_native and native is None:
        raise RuntimeError("the C++ BPE trainer (csrc/bpe.cpp) could not be loaded or compiled")
    if native is not None:
        return [tuple(m) for m in native.train_merges(words, counts, num_merges, min_frequency)]
    return _train_merges_python(words, counts, num_merges, min_frequency)


def _train_merges_python(words_in: Sequence[bytes], counts_in: Sequence[int], num_merges: int,
                         min_frequency: int) -> list[tuple[int, int]]:
    """The algorithm of `train_merges` in csrc/bpe.cpp, step for step (see its comments)."""
    words = [list(w) for w in words_in]
    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], list[int]] = {}
    for w, ids in enumerate(words):
        wc = counts_in[w]
        for pair in zip(ids, ids[1:]):
            counts[pair] = counts.get(pair, 0) + wc
            holders = where.setdefault(pair, [])
            if not holders or holders[-1] != w:
                holders.append(w)
    # heapq is a min-heap: (-count, a, b) pops the highest count, then the smallest pair.
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        neg, a, b = heapq.heappop(heap)
        current = counts.get((a, b), 0)
        if current != -neg:
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency or current <= 0:
            break
        token = 256 + len(merges)
        merges.append((a, b))
        grown = []
        for w in where.pop((a, b)):
            ids = words[w]
            merged = _merge(ids, a, b, token)
            if len(merged) == len(ids):
                continue
            wc = counts_in[w]
            for pair in zip(ids, ids[1:]):
                counts[pair] -= wc
            for pair in zip(merged, merged[1:]):
                counts[pair] = counts.get(pair, 0) + wc
                if token in pair:
                    holders = where.setdefault(pair, [])
                    if not holders:
                        grown.append(pair)
                    if not holders or holders[-1] != w:
                        holders.append(w)
            words[w] = merged
        del counts[(a, b)]
        for pair in grown:
            heapq.heappush(heap, (-counts[pair], *pair))
    return merges


def _merge(ids: list[int], a: int, b: int, token: int) -> list[int]:
    """Replace each occurrence of (a, b), left to right without overlap, by `token`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(token)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = "gpt4",
              special_tokens: Sequence[str] = ("<|endoftext|>",), workers: int = 1,
              min_frequency: int = MIN_FREQUENCY, use_native: Optional[bool] = None,
              progress=None) -> ByteLevelBPETokenizer:
    """Train a MegaBPE tokenizer of (at most) `vocab_size` tokens, special tokens included.

    The vocabulary is smaller than asked when the corpus runs out of pairs seen `min_frequency`
    times; `tokenizer.vocab_size` tells the real size.
    """
    pattern = resolve_pattern(pattern)
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise DataError(f"--vocab-size {vocab_size} is too small: it needs at least 256 byte tokens "
                         f"+ {len(special_tokens)} special tokens")
    word_counts = count_words(texts, pattern, workers=workers, progress=progress)
    merges = train_merges(word_counts, num_merges, min_frequency, use_native=use_native)
    return ByteLevelBPETokenizer.from_merges(merges, pattern=pattern, special_tokens=special_tokens)
