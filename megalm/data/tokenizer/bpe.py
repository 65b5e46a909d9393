"""Byte-level BPE tokenizer (MegaBPE and GPT-2) with Hugging Face `tokenizer.json` input/output.

Encoding: split the text on special tokens, split each remaining piece with the pre-tokenisation
regex, and encode each pre-token word by BPE: start from its bytes and repeatedly merge the
adjacent pair with the lowest merge rank. Words are cached, since natural text repeats a small set
of words. Decoding joins the bytes of the tokens and decodes UTF-8, so ``decode(encode(s)) == s``
for every string.

In `tokenizer.json` bytes are written through GPT-2's byte-to-unicode table (each byte becomes a
printable character), so the Hugging Face `tokenizers` library loads our files and produces the
same ids (a `Split` pre-tokenizer with our regex, then `ByteLevel` without its own regex).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Optional, Sequence

import regex

from megalm.data import _native
from megalm.data.errors import DataError
from megalm.data.tokenizer.base import EOD_TOKENS, Tokenizer

# GPT-2 (Radford et al. 2019) and GPT-4 / cl100k (tiktoken) pre-tokenisation patterns.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

_CACHE_LIMIT = 1 << 18


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "gpt4") or a regular expression -> the regular expression."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise DataError(f"the pre-tokenisation pattern {pattern!r} is not a valid regex ({e}); "
                        f"use one of {sorted(PATTERNS)} or a valid expression") from None
    return pattern


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to
    themselves, the rest to code points from 256 up)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _token_bytes(token: str, source: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        raise DataError(f"{source}: token {token!r} is not byte-level BPE (GPT-2 byte-to-unicode); "
                        f"load this file with --tokenizer-type HuggingFaceTokenizer") from None


class ByteLevelBPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary: `tokens[id]` is the byte string of each regular token;
    `merges[r] = (left, right, merged)` are the ids of merge rank r; `special_tokens` maps the
    special strings to their ids."""

    def __init__(self, tokens: dict[int, bytes], merges: Sequence[tuple[int, int, int]], pattern: str,
                 special_tokens: Optional[dict[str, int]] = None, name: str = "MegaBPE"):
        self.name = name
        self.pattern = resolve_pattern(pattern)
        self.tokens = dict(tokens)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size = max([*self.tokens, *self.special_tokens.values()]) + 1
        self.eod = next((self.special_tokens[t] for t in EOD_TOKENS if t in self.special_tokens),
                        next(iter(self.special_tokens.values()), None))

        by_bytes = {b: i for i, b in self.tokens.items()}
        missing = [b for b in range(256) if bytes([b]) not in by_bytes]
        if missing:
            raise DataError(f"byte-level BPE vocabulary lacks byte tokens {missing[:8]}...: "
                            f"every one of the 256 bytes needs a token")
        self._byte_ids = [by_bytes[bytes([b])] for b in range(256)]
        self._ranks = {(a, b): (r, t) for r, (a, b, t) in enumerate(self.merges)}
        self._id_bytes = dict(self.tokens)
        self._id_bytes.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._split = regex.compile(self.pattern).findall
        self._special_split = None
        if self.special_tokens:
            alternatives = "|".join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))
            self._special_split = regex.compile(f"({alternatives})").split
        self._cache: dict[str, list[int]] = {}
        native = _native.load("bpe")
        self._native = native.Encoder(self._byte_ids, self.merges) if native is not None else None

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[int, int]], pattern: str,
                    special_tokens: Sequence[str] = (), name: str = "MegaBPE") -> "ByteLevelBPETokenizer":
        """Byte tokens have id = byte value, merge r makes id 256 + r, specials come last."""
        tokens = {b: bytes([b]) for b in range(256)}
        full = []
        for r, (a, b) in enumerate(merges):
            tokens[256 + r] = tokens[a] + tokens[b]
            full.append((a, b, 256 + r))
        specials = {s: len(tokens) + k for k, s in enumerate(special_tokens)}
        return cls(tokens, full, pattern, specials, name=name)

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self._special_split is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for k, part in enumerate(self._special_split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token strings as plain text."""
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        ids: list[int] = []
        for word in self._split(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = cache[word] = self._encode_word(word.encode("utf-8"))
            ids += word_ids
        return ids

    def _encode_word(self, word: bytes) -> list[int]:
        if self._native is not None:
            return self._native.encode(word)
        ids = [self._byte_ids[b] for b in word]
        ranks = self._ranks
        while len(ids) >= 2:
            best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, (1 << 62,))[0])
            if best not in ranks:
                break
            token = ranks[best][1]
            merged, i, n = [], 0, len(ids)
            while i < n:
                if i + 1 < n and ids[i] == best[0] and ids[i + 1] == best[1]:
                    merged.append(token)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return b"".join(self._id_bytes[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary of {self.vocab_size} tokens") from None

    # ---- Hugging Face tokenizer.json ----------------------------------------------------------

    def to_hf_json(self) -> dict:
        vocab = {_token_str(b): i for i, b in sorted(self.tokens.items())}
        vocab.update(self.special_tokens)
        merges = [[_token_str(self.tokens[a]), _token_str(self.tokens[b])] for a, b, _ in self.merges]
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": merges},
        }

    def save(self, path: str) -> None:
        """Write `tokenizer.json` (atomically: a temporary file renamed into place)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_json(), f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)

    @classmethod
    def from_hf_json(cls, path: str, name: str = "MegaBPE") -> "ByteLevelBPETokenizer":
        """Load a byte-level BPE `tokenizer.json` (ours, GPT-2's, or any with a ByteLevel
        pre-tokenizer); other kinds need --tokenizer-type HuggingFaceTokenizer."""
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read tokenizer file {path}: {e}") from None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or "vocab" not in model:
            raise DataError(f"{path} is not a BPE tokenizer.json; load it with --tokenizer-type "
                            f"HuggingFaceTokenizer")
        pattern = _pattern_of(spec.get("pre_tokenizer"), path)
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        tokens = {i: _token_bytes(s, path) for s, i in model["vocab"].items() if s not in specials}
        ids = {s: i for s, i in model["vocab"].items()}
        merges = []
        for m in model.get("merges", []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            try:
                merges.append((ids[a], ids[b], ids[a + b]))
            except KeyError:
                raise DataError(f"{path}: merge {a!r} + {b!r} uses a token missing from the vocabulary") from None
        return cls(tokens, merges, pattern, specials, name=name)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str, merge_file: str) -> "ByteLevelBPETokenizer":
        """GPT-2's `vocab.json` + `merges.txt`."""
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merge_file, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read GPT-2 tokenizer files (--vocab-file {vocab_file}, "
                            f"--merge-file {merge_file}): {e}") from None
        specials = {s: i for s, i in vocab.items() if s in EOD_TOKENS}
        tokens = {i: _token_bytes(s, vocab_file) for s, i in vocab.items() if s not in specials}
        merges = []
        for n, line in enumerate(lines, 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(p in vocab for p in parts) or "".join(parts) not in vocab:
                raise DataError(f"{merge_file}:{n}: {line!r} is not a merge of two tokens of {vocab_file}")
            merges.append((vocab[parts[0]], vocab[parts[1]], vocab[parts[0] + parts[1]]))
        return cls(tokens, merges, GPT2_PATTERN, specials, name="GPT2BPETokenizer")


def _pattern_of(pre_tokenizer: Optional[dict], path: str) -> str:
    """The split regex of a byte-level pre-tokenizer: a ByteLevel with its own (GPT-2) regex, or
    a Split(Regex) followed by a ByteLevel without one."""
    if pre_tokenizer is None:
        raise DataError(f"{path} has no pre_tokenizer; load it with --tokenizer-type HuggingFaceTokenizer")
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer["type"] == "Sequence" \
        else [pre_tokenizer]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        return steps[0]["pattern"]["Regex"]
    raise DataError(f"{path}: pre-tokenizer {kinds} is not a plain byte-level split; load it with "
                    f"--tokenizer-type HuggingFaceTokenizer")
