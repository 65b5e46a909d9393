#!/usr/bin/env python
"""Tokenize a corpus into Megatron-LM's memory-mapped `.bin/.idx` format.

    python tools/preprocess_data.py --input clean.jsonl --output-prefix data/corpus \\
        --tokenizer-type MegaBPE --tokenizer-model tok/ --append-eod --workers 4

writes data/corpus_text_document.bin/.idx (one pair per --json-keys key), which --data-path
data/corpus_text_document then reads. --engine spark tokenizes on Spark (--input may then be any
Hadoop-readable URI; the output prefix must be a path every executor can write) into the same bytes.
Tokens are uint16 when the vocabulary has fewer than 65,500 ids, int32 otherwise. Files appear
under their final names only when the run completes. A line that is not JSON is skipped and
counted (--strict: stop at it); a record without a --json-keys key stops the run with its line
number.
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
    group.add_argument("--workers", type=int, default=1, help="Tokenizer processes (local engine).")
    group.add_argument("--engine", default="local", choices=["local", "spark"],
                       help="local: worker processes on this machine; spark: PySpark (pip install megalm[spark]), "
                            "one .bin/.idx pair per partition, merged into the same files as the local engine's.")
    group.add_argument("--spark-master", help="Spark master URL (default: spark-submit's, else local[*]).")
    group.add_argument("--log-interval", type=int, default=1000, help="Accepted for Megatron-LM compatibility; "
                       "progress is shown by the progress bar.")
    group.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser.parse_args(argv)


_worker: dict = {}


def _encoder_args(args) -> tuple:
    """RecordEncoder's arguments: small and picklable, for worker processes and Spark executors."""
    from megalm.data.encode import TokenizerSpec

    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)
    return spec, args.json_keys, args.append_eod


def _init_worker(args) -> None:
    from megalm.data.encode import RecordEncoder

    _worker["encoder"] = RecordEncoder(*_encoder_args(args))


def _encode_batch(batch):
    encoder = _worker["encoder"]
    return [encoder.encode(raw) for raw in batch]


def _tokenize_local(args, prefixes: dict, dtype) -> dict:
    from megalm.data.corpus import iter_raw
    from megalm.data.encode import add_encoded, new_stats
    from megalm.data.indexed_dataset import IndexedDatasetBuilder
    from megalm.data.progress import Progress, total_bytes
    from megalm.data.workers import batches_by_size, ordered_map, worker_pool

    builders = {key: IndexedDatasetBuilder(prefix, dtype) for key, prefix in prefixes.items()}
    stats = new_stats()
    try:
        batches = batches_by_size(iter_raw(args.input, args.text_sample_by), max_records=1024)
        with worker_pool(args.workers, _init_worker if args.workers > 1 else None, (args,)) as pool, \
                Progress("tokenizing", total_bytes(args.input), enabled=False if args.no_progress else None) as bar:
            for result in ordered_map(pool, _encode_batch, batches):
                documents, tokens = stats["documents"], stats["tokens"]
                for encoded in result:
                    add_encoded(encoded, builders, stats, args.strict)
                bar.update(sum(e.size for e in result), stats["documents"] - documents, stats["tokens"] - tokens)
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.discard()
        raise
    return stats


def main(argv=None) -> int:
    from megalm.data.corpus import check_inputs, invalid_utf8_note
    from megalm.data.errors import DataError

    args = parse_args(argv)
    if args.engine == "local":
        check_inputs(args.input)
    else:
        from megalm.data.spark_engine import check_spark_inputs
        check_spark_inputs(args.input)
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    _init_worker(args)  # fails early, in the main process, on a bad tokenizer
    tokenizer, dtype = _worker["encoder"].tokenizer, _worker["encoder"].dtype
    if args.append_eod and tokenizer.eod is None:
        raise DataError(f"--append-eod: the {tokenizer.name} tokenizer has no end-of-document token")
    if os.path.dirname(args.output_prefix):
        os.makedirs(os.path.dirname(args.output_prefix), exist_ok=True)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    start = time.perf_counter()
    if args.engine == "spark":
        from megalm.data.spark_engine import spark_session, tokenize_on_spark

        spark = spark_session(args.spark_master, "megalm preprocess_data")
        stats = tokenize_on_spark(spark, args.input, args.text_sample_by, _encoder_args(args), prefixes, dtype,
                                  args.strict)
    else:
        stats = _tokenize_local(args, prefixes, dtype)
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
