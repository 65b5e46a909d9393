"""Any `tokenizer.json`, through the Hugging Face `tokenizers` library (imported on use)."""

from __future__ import annotations

from typing import Sequence

from megalm.data.errors import DataError
from megalm.data.tokenizer.base import EOD_TOKENS, Tokenizer


class HuggingFaceTokenizer(Tokenizer):
    name = "HuggingFaceTokenizer"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise DataError("--tokenizer-type HuggingFaceTokenizer needs the tokenizers package: "
                            "pip install tokenizers") from None
        try:
            self.tokenizer = HFTokenizer.from_file(path)
        except Exception as e:  # the library raises its own Exception subclass for bad files
            raise DataError(f"cannot load {path} (--tokenizer-model) with the tokenizers library: {e}") from None
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.eod = next((vocab[t] for t in EOD_TOKENS if t in vocab), None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
