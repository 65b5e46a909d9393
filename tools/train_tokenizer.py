#!/usr/bin/env python
"""Train a tokenizer on jsonl or plain-text files.

    python tools/train_tokenizer.py --input clean.jsonl --vocab-size 8192 --output-dir tok/
    python tools/train_tokenizer.py --input a.txt b.txt --vocab-size 32000 --output-dir tok/ \\
        --tokenizer-type SentencePiece

MegaBPE (default) writes DIR/tokenizer.json (Hugging Face format; use it with --tokenizer-type
MegaBPE or HuggingFaceTokenizer); SentencePiece writes DIR/tokenizer.model (--tokenizer-type
SentencePieceTokenizer). The vocabulary size counts the special tokens.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.data.cli import ArgumentParser, run  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl / text / parquet files.")
    parser.add_argument("--vocab-size", type=int, required=True, help="Tokens in all, special tokens included.")
    parser.add_argument("--output-dir", required=True, help="Where to write the tokenizer.")
    parser.add_argument("--tokenizer-type", default="MegaBPE", choices=["MegaBPE", "SentencePiece"])
    parser.add_argument("--json-keys", default="text", help="Key of the text in jsonl / parquet records.")
    parser.add_argument("--text-sample-by", default="paragraph", choices=["line", "paragraph", "document"],
                        help="How plain text files split into documents.")
    parser.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"],
                        help="Special tokens; the first is the end-of-document token for MegaBPE "
                             "(SentencePiece always has <unk>, <s> and </s>, </s> ending documents).")
    parser.add_argument("--pattern", default="gpt4",
                        help="MegaBPE pre-tokenisation regex: gpt4 (cl100k), gpt2, or an expression.")
    parser.add_argument("--min-frequency", type=int, default=2, help="MegaBPE: stop when the best pair is rarer.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Processes for pre-tokenisation.")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="SentencePiece: lines sampled for training (it holds them all in memory).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from megalm.data.corpus import check_inputs, iter_texts
    from megalm.data.errors import DataError
    from megalm.data.progress import Progress

    args = parse_args(argv)
    check_inputs(args.input)
    if args.vocab_size < 1:
        raise DataError(f"--vocab-size must be positive, got {args.vocab_size}")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    texts = iter_texts(args.input, args.json_keys, args.text_sample_by)
    # MegaBPE reports characters, SentencePiece UTF-8 bytes: a rate, not a share of the file size.
    with Progress("reading", None, enabled=False if args.no_progress else None) as bar:
        if args.tokenizer_type == "SentencePiece":
            from megalm.data.tokenizer.sentencepiece import SentencePieceTokenizer, train_sentencepiece

            def counted(items):
                for text in items:
                    bar.update(len(text.encode("utf-8")), 1)
                    yield text

            path = train_sentencepiece(counted(texts), args.vocab_size, args.output_dir, args.special_tokens,
                                       args.max_sentences, args.workers)
            tokenizer = SentencePieceTokenizer(path)
        else:
            from megalm.data.tokenizer.bpe import resolve_pattern
            from megalm.data.tokenizer.bpe_train import train_bpe

            tokenizer = train_bpe(texts, args.vocab_size, resolve_pattern(args.pattern), args.special_tokens,
                                  workers=args.workers, min_frequency=args.min_frequency,
                                  progress=lambda chars: bar.update(chars))
            path = os.path.join(args.output_dir, "tokenizer.json")
            tokenizer.save(path)
    seconds = time.perf_counter() - start
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus supports only {tokenizer.vocab_size} tokens (pairs seen fewer than "
              f"--min-frequency {args.min_frequency} times are not merged)", file=sys.stderr)
    print(json.dumps({"tokenizer": path, "type": args.tokenizer_type, "vocab_size": tokenizer.vocab_size,
                      "eod": tokenizer.eod, "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    run(main)
