"""What every tokenizer offers the rest of megalm."""

from __future__ import annotations

from typing import Optional, Sequence

# Names under which tokenizers mark the end of a document, most common first.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


class Tokenizer:
    """Text <-> token ids.

    `vocab_size` counts every id the tokenizer can produce, special tokens included, so ids are in
    ``[0, vocab_size)``; `eod` is the end-of-document id appended between documents (None when the
    vocabulary has no such token).
    """

    name: str = "Tokenizer"
    vocab_size: int
    eod: Optional[int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"
