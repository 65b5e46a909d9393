"""Tokenizers, by Megatron-LM's `--tokenizer-type` names.

=====================  =====================================================================
GPT2BPETokenizer       GPT-2 `vocab.json` + `merges.txt` (--vocab-file, --merge-file)
SentencePieceTokenizer a SentencePiece `tokenizer.model` (--tokenizer-model)
HuggingFaceTokenizer   any `tokenizer.json`, through the `tokenizers` library (--tokenizer-model)
MegaBPE                our byte-level BPE `tokenizer.json` (tools/train_tokenizer.py)
NullTokenizer          the text is space-separated ids (--vocab-size)
=====================  =====================================================================

`--tokenizer-model` may name the file or a directory that holds `tokenizer.json` /
`tokenizer.model` (or, for GPT2BPETokenizer, `vocab.json` and `merges.txt`).
"""

from __future__ import annotations

import os
from typing import Optional

from megalm.config import TOKENIZER_TYPES
from megalm.data.errors import DataError
from megalm.data.tokenizer.base import Tokenizer

__all__ = ["TOKENIZER_TYPES", "Tokenizer", "build_tokenizer", "load_tokenizer", "vocabulary_size"]


def build_tokenizer(data_config) -> Tokenizer:
    """The tokenizer described by a `DataConfig` (tokenizer_type, tokenizer_model, vocab_file,
    merge_file, vocab_size)."""
    return load_tokenizer(data_config.tokenizer_type, tokenizer_model=data_config.tokenizer_model,
                          vocab_file=data_config.vocab_file, merge_file=data_config.merge_file,
                          vocab_size=data_config.vocab_size)


def vocabulary_size(data_config) -> Optional[int]:
    """The size of the vocabulary a `DataConfig` describes: the tokenizer's, or --vocab-size when the
    ids are given directly (NullTokenizer, or no tokenizer with --mock-data); None if not given."""
    if data_config.tokenizer_type in (None, "NullTokenizer"):
        return data_config.vocab_size
    return build_tokenizer(data_config).vocab_size


def load_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str] = None,
                   vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                   vocab_size: Optional[int] = None) -> Tokenizer:
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {tokenizer_type!r} is unknown; choose one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "NullTokenizer":
        from megalm.data.tokenizer.null import NullTokenizer
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        from megalm.data.tokenizer.bpe import ByteLevelBPETokenizer
        if tokenizer_model and os.path.isdir(tokenizer_model):
            vocab_file = vocab_file or os.path.join(tokenizer_model, "vocab.json")
            merge_file = merge_file or os.path.join(tokenizer_model, "merges.txt")
        if not vocab_file or not merge_file:
            raise DataError("--tokenizer-type GPT2BPETokenizer needs --vocab-file vocab.json and "
                            "--merge-file merges.txt")
        _check_file(vocab_file, "--vocab-file")
        _check_file(merge_file, "--merge-file")
        return ByteLevelBPETokenizer.from_gpt2_files(vocab_file, merge_file)
    if tokenizer_type == "SentencePieceTokenizer":
        from megalm.data.tokenizer.sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer(_model_file(tokenizer_model, "tokenizer.model", tokenizer_type))
    path = _model_file(tokenizer_model, "tokenizer.json", tokenizer_type)
    if tokenizer_type == "HuggingFaceTokenizer":
        from megalm.data.tokenizer.huggingface import HuggingFaceTokenizer
        return HuggingFaceTokenizer(path)
    from megalm.data.tokenizer.bpe import ByteLevelBPETokenizer
    return ByteLevelBPETokenizer.from_hf_json(path)


def _model_file(tokenizer_model: Optional[str], filename: str, tokenizer_type: str) -> str:
    if not tokenizer_model:
        raise DataError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model (a {filename} "
                        f"or the directory holding it)")
    path = os.path.join(tokenizer_model, filename) if os.path.isdir(tokenizer_model) else tokenizer_model
    _check_file(path, "--tokenizer-model")
    return path


def _check_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file")
