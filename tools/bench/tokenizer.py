#!/usr/bin/env python
"""Tokenizer benchmark: MegaBPE against Hugging Face `tokenizers` and SentencePiece, one run.

    python tools/bench/tokenizer.py [--max-mb 20] [--vocab-size 8192] [--workers 2]

Corpus: the Python standard library's own sources (every machine has them). All three train a
byte-level BPE of the same vocabulary size on the same texts; MegaBPE and `tokenizers` also share
the pre-tokenisation regex (--pattern, GPT-4 style by default). Reported: training time and its ratio to `tokenizers`,
compression (UTF-8 bytes per token) on the training corpus, and encoding throughput in MB/s of
one process (`tokenizers` single-threaded for a like-for-like number, and with all its threads).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megalm.data.tokenizer.bpe import PATTERNS  # noqa: E402
from megalm.data.tokenizer.bpe_train import train_bpe  # noqa: E402
from tools.make_stdlib_corpus import stdlib_sources  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def train_hf(texts, vocab_size, special, pattern):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=20.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pattern", default="gpt4", choices=sorted(PATTERNS),
                        help="Pre-tokenisation regex shared by MegaBPE and tokenizers.")
    parser.add_argument("--skip-sentencepiece", action="store_true")
    args = parser.parse_args()
    texts = [text for _, text in stdlib_sources(int(args.max_mb * 1e6))]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    special = ["<|endoftext|>"]
    print(f"corpus: {len(texts)} stdlib files, {nbytes / 1e6:.1f} MB; vocabulary {args.vocab_size}; "
          f"{args.workers} workers / threads; {args.pattern} pre-tokenisation", flush=True)

    results = {}
    ours, t_ours = timed(lambda: train_bpe(texts, args.vocab_size, args.pattern, special, workers=args.workers))
    hf, t_hf = timed(lambda: train_hf(texts, args.vocab_size, special, PATTERNS[args.pattern]))
    results["train_s"] = {"megabpe": t_ours, "tokenizers": t_hf}
    if not args.skip_sentencepiece:
        from megalm.data.tokenizer.sentencepiece import SentencePieceTokenizer, train_sentencepiece
        with tempfile.TemporaryDirectory() as tmp:
            path, t_sp = timed(lambda: train_sentencepiece(texts, args.vocab_size, tmp, special,
                                                           workers=args.workers))
            sp = SentencePieceTokenizer(path)
            sp_ids, t_sp_enc = timed(lambda: [sp.encode(t) for t in texts])
        results["train_s"]["sentencepiece"] = t_sp

    ours_ids, t_ours_enc = timed(lambda: [ours.encode(t) for t in texts])
    hf_ids, t_hf_enc = timed(lambda: [hf.encode(t).ids for t in texts])
    _, t_hf_batch = timed(lambda: hf.encode_batch(texts))
    results["bytes_per_token"] = {"megabpe": nbytes / sum(map(len, ours_ids)),
                                  "tokenizers": nbytes / sum(map(len, hf_ids))}
    results["encode_MB_s"] = {"megabpe (1 process)": nbytes / 1e6 / t_ours_enc,
                              "tokenizers (1 thread)": nbytes / 1e6 / t_hf_enc,
                              f"tokenizers encode_batch ({os.cpu_count()} threads)": nbytes / 1e6 / t_hf_batch}
    if not args.skip_sentencepiece:
        results["bytes_per_token"]["sentencepiece"] = nbytes / sum(map(len, sp_ids))
        results["encode_MB_s"]["sentencepiece (1 process)"] = nbytes / 1e6 / t_sp_enc

    print("\ntraining time (s), ratio to tokenizers (< 1: faster)")
    for name, seconds in results["train_s"].items():
        print(f"  {name:<14} {seconds:7.2f}  {seconds / t_hf:5.2f}x")
    print("compression (UTF-8 bytes per token, higher is better)")
    for name, value in results["bytes_per_token"].items():
        print(f"  {name:<14} {value:7.3f}  {value / results['bytes_per_token']['tokenizers']:5.3f}x")
    print("encoding throughput (MB/s)")
    for name, value in results["encode_MB_s"].items():
        print(f"  {name:<40} {value:7.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
