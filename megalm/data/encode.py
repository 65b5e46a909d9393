"""Tokenizing records: the per-record step of `tools/preprocess_data.py`, one implementation for
its local worker processes and its Spark executors (`spark_engine.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megalm.data.corpus import RawRecord, RecordError, parse_record
from megalm.data.errors import DataError
from megalm.data.indexed_dataset import token_dtype


@dataclass
class TokenizerSpec:
    """What `load_tokenizer` needs; small and picklable, so each worker loads its own tokenizer."""
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None

    def load(self):
        from megalm.data.tokenizer import load_tokenizer
        return load_tokenizer(self.tokenizer_type, self.tokenizer_model, self.vocab_file, self.merge_file,
                              self.vocab_size)


@dataclass
class Encoded:
    size: int  # bytes read
    tokens: Optional[dict]  # {key: token array}, None when the record is unusable
    kind: Optional[str] = None  # "malformed", "missing_key" or "tokenizer" when tokens is None
    error: Optional[str] = None
    invalid_utf8: bool = False


class RecordEncoder:
    def __init__(self, spec: TokenizerSpec, keys: Sequence[str], append_eod: bool):
        self.tokenizer = spec.load()
        self.keys, self.append_eod = list(keys), append_eod
        self.dtype = token_dtype(self.tokenizer.vocab_size)

    def encode(self, raw: RawRecord) -> Encoded:
        try:
            record, replaced = parse_record(raw, self.keys)
        except RecordError as e:
            return Encoded(raw.size, None, e.kind, str(e))
        tokens = {}
        try:
            for key in self.keys:
                ids = self.tokenizer.encode(record[key])
                if self.append_eod:
                    ids.append(self.tokenizer.eod)
                tokens[key] = np.asarray(ids, dtype=self.dtype)
        except ValueError as e:
            return Encoded(raw.size, None, "tokenizer", f"{raw.source}:{raw.line}: {e}", replaced)
        return Encoded(raw.size, tokens, invalid_utf8=replaced)


def check_encoded(encoded: Encoded, strict: bool) -> None:
    """Raise DataError for a record that stops the run: a missing key, text the tokenizer cannot
    encode, or a malformed line under --strict (otherwise malformed lines are skipped and counted)."""
    if encoded.kind != "malformed" or strict:
        raise DataError(encoded.error + (" (--strict)" if encoded.kind == "malformed" else ""))


def new_stats() -> dict:
    return {"documents": 0, "tokens": 0, "malformed": 0, "invalid_utf8": 0}


def add_encoded(encoded: Encoded, builders: dict, stats: dict, strict: bool) -> None:
    """Append one record's sequences to `builders` ({key: IndexedDatasetBuilder}) and count it in
    `stats` (see `new_stats`); a record that stops the run raises DataError."""
    stats["invalid_utf8"] += encoded.invalid_utf8
    if encoded.tokens is None:
        check_encoded(encoded, strict)
        stats["malformed"] += 1
        return
    for key, ids in encoded.tokens.items():
        builders[key].add_document(ids)
        stats["tokens"] += len(ids)
    stats["documents"] += 1
