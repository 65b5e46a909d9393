"""SentencePiece models (`tokenizer.model`): loading and training.

The `sentencepiece` package is imported only when a SentencePiece tokenizer is used or trained.
Models trained here are lossless: BPE with byte fallback, the identity normaliser, no dummy
prefix and no whitespace folding, so ``decode(encode(s)) == s`` for text without the meta symbol
U+2581 ("▁"), which SentencePiece itself turns into a space when decoding.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

from megalm.data.errors import DataError
from megalm.data.tokenizer.base import Tokenizer


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise DataError("SentencePiece tokenizers need the sentencepiece package: pip install sentencepiece") from None
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str):
        spm = _import_sentencepiece()
        try:
            self.processor = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot load SentencePiece model {model_file} (--tokenizer-model): {e}") from None
        self.model_file = model_file
        self.vocab_size = self.processor.get_piece_size()
        eos = self.processor.eos_id()
        self.eod = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output_dir: str,
                        special_tokens: Sequence[str] = (), max_sentences: int = 2_000_000,
                        workers: Optional[int] = None) -> str:
    """Train a byte-fallback BPE SentencePiece model; returns the path of `tokenizer.model`.

    SentencePiece reads whole sentences into memory, so at most `max_sentences` lines (sampled
    by SentencePiece itself) are used (its `input_sentence_size`).
    """
    spm = _import_sentencepiece()
    os.makedirs(output_dir, exist_ok=True)
    corpus = os.path.join(output_dir, f".sentencepiece-input.{os.getpid()}.txt")
    prefix = os.path.join(output_dir, "tokenizer")
    try:
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                for line in text.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            user_defined_symbols=[s for s in special_tokens if s not in ("<s>", "</s>", "<unk>")],
            num_threads=workers or os.cpu_count() or 1, minloglevel=2,
            max_sentence_length=1 << 16, hard_vocab_limit=False)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}") from None
    finally:
        if os.path.exists(corpus):
            os.remove(corpus)
    os.remove(prefix + ".vocab")
    return prefix + ".model"
