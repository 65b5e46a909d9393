#!/usr/bin/env python
"""Clean a raw corpus: normalise, filter by language and quality, remove (near) duplicates.

    python tools/clean_corpus.py --input raw.jsonl [more.txt data.parquet] --output clean.jsonl \\
        [--rejected rejected.jsonl] [--json-keys text] [--workers 4] [--language zh en]

--engine spark runs the same rules on PySpark (--spark-master, or spark-submit's master; local[*]
by default) with the same kept documents. Prints a table of the documents removed per rule, then,
as the last line, the same counts as one JSON object. See docs/DATA.md for the rules and their defaults.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.data.cli import ArgumentParser, add_dataclass_flags, dataclass_from_args, run  # noqa: E402


def parse_args(argv=None):
    from megalm.data.clean import CleanConfig
    from megalm.data.filters import FilterConfig
    from megalm.data.pii import PIIConfig
    from megalm.data.quality import QualityConfig

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl / text / parquet files (.gz works).")
    parser.add_argument("--output", required=True, help="Kept documents, jsonl.")
    parser.add_argument("--rejected", help="Also write the removed documents here, with a 'rejected_by' field.")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes (default: 1; local engine).")
    parser.add_argument("--engine", default="local", choices=["local", "spark"],
                        help="local: worker processes on this machine (default); spark: PySpark (pip install "
                             "'megalm[spark]'), the same rules and the same kept documents; --input and --output "
                             "may then be any Hadoop-readable URI.")
    parser.add_argument("--spark-master", help="Spark master URL (default: spark-submit's, else local[*]).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    add_dataclass_flags(parser, CleanConfig, "cleaning steps")
    add_dataclass_flags(parser, QualityConfig, "quality rules (with --quality; Gopher defaults)")
    add_dataclass_flags(parser, PIIConfig, "PII redaction (each kind on by default)")
    add_dataclass_flags(parser, FilterConfig, "harmful-content filters (off until given a list or function)")
    args = parser.parse_args(argv)
    return args, [dataclass_from_args(cls, args) for cls in (CleanConfig, QualityConfig, PIIConfig, FilterConfig)]


def main(argv=None) -> int:
    from megalm.data.clean import clean_corpus
    from megalm.data.corpus import check_inputs
    from megalm.data.errors import DataError
    from megalm.data.progress import Progress, total_bytes

    args, (config, quality, pii, filters) = parse_args(argv)
    if args.engine == "spark":
        return _main_spark(args, config, quality, pii, filters)
    check_inputs(args.input)
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    for path in (args.output, args.rejected):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.perf_counter()
    with Progress("cleaning", total_bytes(args.input), enabled=False if args.no_progress else None) as bar:
        counts = clean_corpus(args.input, args.output, config, quality, rejected=args.rejected,
                              workers=args.workers, progress=lambda n, d: bar.update(n, d), pii=pii,
                              filters=filters)
    _report(counts, start)
    return 0


def _main_spark(args, config, quality, pii, filters) -> int:
    from megalm.data.clean import check_config
    from megalm.data.spark_engine import check_spark_inputs, clean_on_spark, spark_session

    check_spark_inputs(args.input)
    check_config(config, quality, filters)  # flag mistakes fail before Spark's start-up
    start = time.perf_counter()
    spark = spark_session(args.spark_master, "megalm clean_corpus")
    counts = clean_on_spark(spark, args.input, args.output, config, quality, rejected=args.rejected, pii=pii,
                            filters=filters)
    _report(counts, start)
    return 0


def _report(counts: dict, start: float) -> None:
    from megalm.data.clean import summary_table

    counts["seconds"] = round(time.perf_counter() - start, 2)
    print(summary_table(counts))
    print(json.dumps(counts))


if __name__ == "__main__":
    run(main)
