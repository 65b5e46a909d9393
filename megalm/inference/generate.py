"""Autoregressive generation with a KV cache, for the tools: the model-level core
(`megalm.model.generation`: sampling parameters, logits processing, batched generation with stop
tokens and stop strings) re-exported, and `TextStreamer`, which writes a row's text as it comes.
"""

from __future__ import annotations

from typing import Callable

from megalm.model.generation import Generation, SamplingParams, generate, next_tokens, process_logits

__all__ = ["Generation", "SamplingParams", "TextStreamer", "generate", "next_tokens", "process_logits"]


class TextStreamer:
    """Writes the text of one row as its tokens arrive (on_token for `generate`).

    Tokens may end inside a multi-byte character, so the text is decoded from all tokens so far and
    only the new, complete part is written.
    """

    def __init__(self, decode: Callable[[list], str], write: Callable[[str], None], row: int = 0):
        self.decode, self.write, self.row = decode, write, row
        self.tokens: list = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        if row != self.row:
            return
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)
