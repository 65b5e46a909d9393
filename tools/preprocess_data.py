#!/usr/bin/env python
"""Tokenize a corpus into Megatron-LM's memory-mapped `.bin/.idx` format.

    python tools/preprocess_data.py --input clean.jsonl --output-prefix data/corpus \\
        --tokenizer-type MegaBPE --tokenizer-model tok/ --append-eod --workers 4

writes data/corpus_text_document.bin/.idx (one pair per --json-keys key), which --data-path
data/corpus_text_document then reads. Tokens are uint16 when the vocabulary has fewer than 65,500
ids, int32 otherwise. Files appear under their final names only when the run completes. A line
that is not JSON is skipped and counted (--strict: stop at it); a record without a --json-keys
key stops the run with its line number.
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
    from megalm.data.tokenizer import TOKENIZER_TYPES

    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="jsonl / text / parquet files (.gz works).")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="Keys to tokenize, one dataset each.")
    group.add_argument("--text-sample-by", default="paragraph", choices=["line", "paragraph", "document"],
                       help="How plain text files split into documents.")
    group.add_argument("--strict", action="store_true", help="Stop at a malformed line instead of skipping it.")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="tokenizer.json / tokenizer.model, or the directory holding it.")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json.")
    group.add_argument("--merge-file", help="GPT-2 merges.txt.")
    group.add_argument("--vocab-size", type=int, help="Vocabulary size (NullTokenizer).")
    group.add_argument("--append-eod", action="store_true", help="Append the end-of-document token to each document.")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="Writes PREFIX_{key}_document.bin/.idx.")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="Tokenizer processes.")
    group.add_argument("--log-interval", type=int, default=1000, help="Accepted for Megatron-LM compatibility; "
                       "progress is shown by the progress bar.")
    group.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser.parse_args(argv)


_worker: dict = {}


def _init_worker(args) -> None:
    from megalm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                               args.vocab_size)
    _worker.update(tokenizer=tokenizer, keys=args.json_keys, append_eod=args.append_eod, strict=args.strict,
                   dtype=_dtype(tokenizer))


def _dtype(tokenizer):
    from megalm.data.indexed_dataset import token_dtype
    return token_dtype(tokenizer.vocab_size)


def _encode_batch(batch):
    """[(size, {key: tokens} or None, error kind or None, error or None, invalid UTF-8 replaced)]
    for a batch of raw records."""
    import numpy as np

    from megalm.data.corpus import RecordError, parse_record

    tokenizer, keys = _worker["tokenizer"], _worker["keys"]
    out = []
    for raw in batch:
        try:
            record, replaced = parse_record(raw, keys)
        except RecordError as e:
            out.append((raw.size, None, e.kind, str(e), False))
            continue
        encoded = {}
        try:
            for key in keys:
                ids = tokenizer.encode(record[key])
                if _worker["append_eod"]:
                    ids.append(tokenizer.eod)
                encoded[key] = np.asarray(ids, dtype=_worker["dtype"])
        except ValueError as e:
            out.append((raw.size, None, "tokenizer", f"{raw.source}:{raw.line}: {e}", replaced))
            continue
        out.append((raw.size, encoded, None, None, replaced))
    return out


def main(argv=None) -> int:
    from megalm.data.corpus import check_inputs, invalid_utf8_note, iter_raw
    from megalm.data.errors import DataError
    from megalm.data.indexed_dataset import IndexedDatasetBuilder
    from megalm.data.progress import Progress, total_bytes
    from megalm.data.workers import batches_by_size, ordered_map, worker_pool

    args = parse_args(argv)
    check_inputs(args.input)
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    _init_worker(args)  # fails early, in the main process, on a bad tokenizer
    tokenizer = _worker["tokenizer"]
    if args.append_eod and tokenizer.eod is None:
        raise DataError(f"--append-eod: the {tokenizer.name} tokenizer has no end-of-document token")
    if os.path.dirname(args.output_prefix):
        os.makedirs(os.path.dirname(args.output_prefix), exist_ok=True)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    builders = {key: IndexedDatasetBuilder(prefix, _dtype(tokenizer)) for key, prefix in prefixes.items()}
    stats = {"documents": 0, "tokens": 0, "malformed": 0, "invalid_utf8": 0}
    start = time.perf_counter()
    try:
        batches = batches_by_size(iter_raw(args.input, args.text_sample_by), max_records=1024)
        with worker_pool(args.workers, _init_worker if args.workers > 1 else None, (args,)) as pool, \
                Progress("tokenizing", total_bytes(args.input), enabled=False if args.no_progress else None) as bar:
            for result in ordered_map(pool, _encode_batch, batches):
                tokens = documents = nbytes = 0
                for size, encoded, kind, error, replaced in result:
                    nbytes += size
                    stats["invalid_utf8"] += replaced
                    if encoded is None:
                        if kind != "malformed" or args.strict:
                            raise DataError(error + (" (--strict)" if kind == "malformed" else ""))
                        stats["malformed"] += 1
                        continue
                    for key, ids in encoded.items():
                        builders[key].add_document(ids)
                        tokens += len(ids)
                    documents += 1
                stats["documents"] += documents
                stats["tokens"] += tokens
                bar.update(nbytes, documents, tokens)
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.discard()
        raise
    seconds = time.perf_counter() - start
    if stats["malformed"]:
        print(f"skipped {stats['malformed']} malformed lines (--strict makes them fatal)", file=sys.stderr)
    if stats["invalid_utf8"]:
        print(invalid_utf8_note(stats["invalid_utf8"]), file=sys.stderr)
    print(json.dumps({**stats, "seconds": round(seconds, 2), "tokens_per_second": round(stats["tokens"] / seconds),
                      "outputs": list(prefixes.values())}))
    return 0


if __name__ == "__main__":
    run(main)
