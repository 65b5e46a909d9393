"""Text normalisation and word splitting shared by the cleaning steps.

Words: runs of non-space characters, except in Chinese and Japanese (Han / Hiragana / Katakana),
which put no spaces between words. There a run of CJK characters is cut by a segmenter: "char"
makes every character a word of its own (Gopher's word counts then count characters, the usual
convention), "jieba" uses jieba's dictionary words where that package is installed. Mixed
documents are split run by run, so the English words inside Chinese text stay whole.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata

import regex

NORMAL_FORMS = ("NFC", "NFKC", "none")
CJK_SEGMENTERS = ("char", "jieba")

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORDS = regex.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_CHAR = regex.compile(rf"[{_CJK}]")
_RUNS = regex.compile(rf"[{_CJK}]+|[^\s{_CJK}]+")
# The simple patterns use the standard `re`, several times faster than `regex` on them.
# C0/C1 controls except tab and newline, plus the byte-order mark / zero-width no-break space.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
# Unicode spaces other than the plain space (the ideographic space U+3000 is kept: CJK layout).
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str, form: str = "NFC", strip_control: bool = True, fix_whitespace: bool = True) -> str:
    """Unicode normal form, control characters out, tidy whitespace.

    Whitespace tidying keeps indentation and single blank lines (code and poetry survive): line
    ends become ``\\n``, exotic spaces become spaces, trailing spaces go, runs of blank lines
    shrink to one, and the document loses leading and trailing blank lines.
    """
    if form not in NORMAL_FORMS:
        raise ValueError(f"unknown normal form {form!r}; choose one of {', '.join(NORMAL_FORMS)}")
    if form != "none":
        text = unicodedata.normalize(form, text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if strip_control:
        text = _CONTROL.sub("", text)
    if fix_whitespace:
        if not text.isascii():
            text = _SPACES.sub(" ", text)
        # The substring tests are much faster than a regex scan and usually say "nothing to do".
        if " \n" in text or "\t\n" in text:
            text = _TRAILING.sub("\n", text)
        if "\n\n\n" in text:
            text = _BLANK_RUNS.sub("\n\n", text)
        text = text.rstrip(" \t\n").strip("\n")
    return text


def has_cjk(text: str) -> bool:
    return not text.isascii() and _CJK_CHAR.search(text) is not None


def split_words(text: str, segmenter: str = "char") -> list[str]:
    """The words of `text`; CJK runs cut per `segmenter` (one of CJK_SEGMENTERS)."""
    if not has_cjk(text):
        return text.split()
    if segmenter == "char":
        return _WORDS.findall(text)
    cut = jieba_cut()
    words = []
    for run in _RUNS.findall(text):
        if _CJK_CHAR.match(run):
            words.extend(cut(run))
        else:
            words.append(run)
    return words


@functools.lru_cache(maxsize=1)
def jieba_cut():
    """jieba's precise-mode segmenter (its dictionary loads once per process, ~1 s)."""
    try:
        import jieba
    except ImportError:
        from megalm.data.errors import DataError
        raise DataError("--cjk-segmenter jieba needs the jieba package: pip install jieba "
                        "(or use --cjk-segmenter char)") from None
    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut


def is_cjk_word(word: str) -> bool:
    """A word of a CJK run (a character, or a segmenter's word): words never mix scripts."""
    return _CJK_CHAR.match(word) is not None


def cjk_fraction(words: list[str]) -> float:
    """Fraction of the words that are CJK words."""
    if not words:
        return 0.0
    return sum(1 for w in words if is_cjk_word(w)) / len(words)


@functools.lru_cache(maxsize=1)
def _simplify_table() -> dict:
    """`str.translate` table: punctuation and symbols become spaces, decimal digits 0 (planes 0
    and 1, which hold all of them but a few rare symbols)."""
    table = {}
    for code in range(0x20000):
        category = unicodedata.category(chr(code))
        if category[0] in "PS":
            table[code] = " "
        elif category == "Nd":
            table[code] = "0"
    return table


def simplify_for_hashing(text: str) -> str:
    """Datatrove-style text simplification before near-duplicate hashing: lower case, no
    punctuation or symbols, every digit 0 (words are then split on whitespace)."""
    return text.lower().translate(_simplify_table())
