"""NullTokenizer: the text already is token ids.

As in Megatron-LM, `encode("12 7 3")` gives ``[12, 7, 3]`` and `decode` writes the ids back as
space-separated integers. One difference: Megatron's vocabulary has ``N + 1`` ids with the
end-of-document id ``N``; here ``--vocab-size N`` means ids ``0 .. N-1`` in all, and the last one,
``N - 1``, is the end-of-document id (so data ids should stay below ``N - 1``).
"""

from __future__ import annotations

from typing import Sequence

from megalm.data.errors import DataError
from megalm.data.tokenizer.base import Tokenizer


class NullTokenizer(Tokenizer):
    name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if not vocab_size or int(vocab_size) < 2:
            raise DataError(f"--tokenizer-type NullTokenizer needs --vocab-size N >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise ValueError("NullTokenizer reads space-separated integer ids; the text holds "
                             f"something else: {text[:60]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} is outside [0, {self.vocab_size}) (--vocab-size)")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
