"""Text normalisation and word splitting shared by the cleaning steps.

Words: runs of non-space characters, except that every Han / Hiragana / Katakana character is a
word of its own, since Chinese and Japanese put no spaces between words (Gopher's word counts
then count characters for CJK text, the usual convention).
"""

from __future__ import annotations

import functools
import re
import unicodedata

import regex

NORMAL_FORMS = ("NFC", "NFKC", "none")

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORDS = regex.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_CHAR = regex.compile(rf"[{_CJK}]")
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


def split_words(text: str) -> list[str]:
    if text.isascii() or _CJK_CHAR.search(text) is None:
        return text.split()
    return _WORDS.findall(text)


def is_cjk_word(word: str) -> bool:
    return len(word) == 1 and _CJK_CHAR.match(word) is not None


def cjk_fraction(words: list[str]) -> float:
    """Fraction of the words that are single CJK characters."""
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
