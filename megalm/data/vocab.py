"""Checks that the tokenizer, the data and the model agree on the vocabulary."""

from __future__ import annotations

from typing import Sequence

from megalm.data.errors import DataError


def check_vocab(tokenizer_vocab_size: int, padded_vocab_size: int) -> None:
    """The model's (padded) vocabulary must hold every id of the tokenizer."""
    if tokenizer_vocab_size > padded_vocab_size:
        raise DataError(f"tokenizer has {tokenizer_vocab_size} tokens but the model's vocabulary is "
                        f"{padded_vocab_size}; ids at or above {padded_vocab_size} would have no embedding. "
                        f"Use the tokenizer the data was preprocessed with (--tokenizer-type / "
                        f"--tokenizer-model) or a larger --vocab-size")


def check_tokenizer_fits(tokenizer, dataset_prefixes: Sequence[str], padded_vocab_size: int = 0) -> int:
    """Check that every token id in the datasets is below the tokenizer's vocabulary (and the
    model's, when `padded_vocab_size` is given). Returns the largest id found. Reads every
    `.bin` in full, so call it once, before training."""
    from megalm.data.indexed_dataset import IndexedDataset

    limit = tokenizer.vocab_size
    if padded_vocab_size:
        check_vocab(tokenizer.vocab_size, padded_vocab_size)
    largest = -1
    for prefix in dataset_prefixes:
        top = IndexedDataset(prefix).max_token()
        largest = max(largest, top)
        if top >= limit:
            raise DataError(f"{prefix}.bin holds token id {top} but the tokenizer ({tokenizer.name}) has only "
                            f"{limit} tokens: the data was preprocessed with another tokenizer; pass that one "
                            f"(--tokenizer-type / --tokenizer-model) or rerun tools/preprocess_data.py")
    return largest
