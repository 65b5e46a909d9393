"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A).

Each rule compares one statistic of a document with a threshold; `check_quality` returns the name
of the first rule a document breaks, or None. Defaults are those of the paper as implemented by
datatrove. Words come from `megalm.data.text.split_words`, so Chinese and Japanese count one word
per character (or per jieba word with ``--cjk-segmenter jieba``), and the repetition rules' n-grams
are n-grams of those words; two rules are adapted for them:

- mean word length is measured on the non-CJK words and skipped when most words are CJK;
- the stop-word rule is English-only: it applies to documents identified as English, or, when no
  language is known, to documents that are not mostly CJK.

Fractions of characters are taken over the characters of the words (whitespace excluded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import regex

from megalm.data.cli import option
from megalm.data.text import cjk_fraction, is_cjk_word, split_words

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "‣", "⁃", "◦", "▪", "▫", "●", "○", "■", "□", "-", "*", "·")
_SYMBOL_ONLY = regex.compile(r"^[\p{P}\p{S}]+$")
_PARAGRAPHS = regex.compile(r"\n{2,}")


@dataclass
class QualityConfig:
    min_words: int = option(50, "Gopher: fewest words (CJK: characters) a document may have.")
    max_words: int = option(100_000, "Gopher: most words a document may have.")
    min_mean_word_length: float = option(3.0, "Gopher: smallest mean word length (non-CJK words).")
    max_mean_word_length: float = option(10.0, "Gopher: largest mean word length (non-CJK words).")
    max_symbol_word_ratio: float = option(0.1, "Gopher: most '#' or '...' symbols per word.")
    max_bullet_lines_ratio: float = option(0.9, "Gopher: largest fraction of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = option(0.3, "Gopher: largest fraction of lines ending in an ellipsis.")
    min_alpha_words_ratio: float = option(0.8, "Gopher: smallest fraction of words holding a letter.")
    min_stop_words: int = option(2, "Gopher: fewest English stop words (English documents only).")
    max_duplicate_lines_ratio: float = option(0.3, "Gopher: largest fraction of lines that repeat an earlier one.")
    max_duplicate_lines_chars: float = option(0.2, "Gopher: largest character fraction in repeated lines.")
    max_duplicate_paragraphs_ratio: float = option(0.3, "Gopher: largest fraction of repeated paragraphs.")
    max_duplicate_paragraphs_chars: float = option(0.2, "Gopher: largest character fraction in repeated "
                                                      "paragraphs.")
    max_top_ngram_chars: list = option([0.20, 0.18, 0.16], "Gopher: largest character fraction of the most "
                                                         "frequent 2-, 3- and 4-gram.")
    max_duplicate_ngram_chars: list = option([0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
                                           "Gopher: largest character fraction in repeated 5- ... 10-grams.")


def check_quality(text: str, config: QualityConfig, language: Optional[str] = None,
                  segmenter: str = "char") -> Optional[str]:
    """The name of the first rule `text` breaks, or None when it passes them all; `segmenter` cuts
    CJK runs into words (`text.split_words`)."""
    words = split_words(text, segmenter)
    content = [w for w in words if not _SYMBOL_ONLY.match(w)]
    if len(content) < config.min_words:
        return "too_few_words"
    if len(content) > config.max_words:
        return "too_many_words"
    cjk = cjk_fraction(words) > 0.5
    if not cjk:
        lengths = [len(w) for w in content if not is_cjk_word(w)]
        mean = sum(lengths) / len(lengths) if lengths else 0.0
        if not config.min_mean_word_length <= mean <= config.max_mean_word_length:
            return "mean_word_length"
    symbols = max(text.count("#"), text.count("...") + text.count("…"))
    if symbols / len(words) > config.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        if sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > config.max_bullet_lines_ratio:
            return "bullet_lines"
        ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipsis / len(lines) > config.max_ellipsis_lines_ratio:
            return "ellipsis_lines"
    if sum(1 for w in words if any(c.isalpha() for c in w)) / len(words) < config.min_alpha_words_ratio:
        return "alpha_words"
    english = language == "en" or (language is None and not cjk)
    if english and sum(1 for w in words if w.lower() in STOP_WORDS) < config.min_stop_words:
        return "stop_words"
    return _check_repetition(text, lines, words, config)


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number, characters) of the items that repeat an earlier item."""
    seen: set = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _check_repetition(text: str, lines: list[str], words: list[str], config: QualityConfig) -> Optional[str]:
    if lines:
        count, chars = _duplicates(lines)
        if count / len(lines) > config.max_duplicate_lines_ratio:
            return "duplicate_lines"
        if chars / max(1, sum(map(len, lines))) > config.max_duplicate_lines_chars:
            return "duplicate_lines_chars"
    paragraphs = [p for p in _PARAGRAPHS.split(text) if p.strip()]
    if paragraphs:
        count, chars = _duplicates(paragraphs)
        if count / len(paragraphs) > config.max_duplicate_paragraphs_ratio:
            return "duplicate_paragraphs"
        if chars / max(1, sum(map(len, paragraphs))) > config.max_duplicate_paragraphs_chars:
            return "duplicate_paragraphs_chars"

    vocabulary: dict[str, int] = {}
    ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in words], dtype=np.uint64)
    word_chars = np.array([len(w) for w in words], dtype=np.int64)
    total_chars = int(word_chars.sum())
    if total_chars == 0:
        return None
    prefix_chars = np.concatenate([[0], np.cumsum(word_chars)])
    for n, limit in zip((2, 3, 4), config.max_top_ngram_chars):
        if len(words) < n:
            break
        hashes = _ngram_hashes(ids, n)
        values, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > 1:
            start = int(first[top])
            ngram_chars = int(prefix_chars[start + n] - prefix_chars[start])
            if ngram_chars * int(counts[top]) / total_chars > limit:
                return f"top_{n}gram_chars"
    for n, limit in zip(range(5, 11), config.max_duplicate_ngram_chars):
        if len(words) < n:
            break
        covered = _repeated_ngram_cover(ids, n)
        if int(word_chars[covered].sum()) / total_chars > limit:
            return f"duplicate_{n}gram_chars"
    return None


_HASH_BASE = np.uint64(0x100000001B3)


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n-gram of word ids (wrapping arithmetic)."""
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _HASH_BASE + ids[k:k + m] + np.uint64(1)
    return h


def _repeated_ngram_cover(ids: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the words inside an n-gram that repeats an earlier n-gram."""
    hashes = _ngram_hashes(ids, n)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    repeat = first[inverse] < np.arange(len(hashes))
    # A word is covered when a repeated n-gram starts within the n positions before it.
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(starts, np.flatnonzero(repeat), 1)
    np.add.at(starts, np.flatnonzero(repeat) + n, -1)
    return np.cumsum(starts[:-1]) > 0


RULES = ("too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio", "bullet_lines",
         "ellipsis_lines", "alpha_words", "stop_words", "duplicate_lines", "duplicate_lines_chars",
         "duplicate_paragraphs", "duplicate_paragraphs_chars", "top_2gram_chars", "top_3gram_chars",
         "top_4gram_chars", *(f"duplicate_{n}gram_chars" for n in range(5, 11)))
