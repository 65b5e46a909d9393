"""The cleaning and tokenizing steps on Spark (`--engine spark`), with the local engine's output.

PySpark is optional (``pip install megalm[spark]``) and imported only here, only when asked for.
The per-document work is the local engine's own code (`clean.DocumentCleaner`,
`encode.RecordEncoder`) run in `mapPartitions`; what Spark adds is the order and the shuffles:

- every record gets its ordinal in input order (files in the order given, lines in file order,
  `zipWithIndex`), the key that replaces "earlier" in the local engine's first-kept rule;
- exact duplicates: a shuffle on the text hash, the smallest ordinal of each hash kept;
- near duplicates: LSH band keys (the local `LSHIndex.band_keys`) grouped by key; a document
  that shares no band bucket with another can neither be a duplicate nor hide one, so it is
  kept at once, and only the candidates (documents in a bucket of two or more) go, with their
  signatures, to the driver, which runs the local `LSHIndex` over them in ordinal order. That is
  the same first-kept rule, so both engines keep the same documents. Driver memory: one
  signature (4 bytes x num_perm) per candidate;
- tokenizing writes one `.bin/.idx` pair per partition, merged in partition order
  (`indexed_dataset.merge_datasets`) into the Megatron layout, byte for byte the local engine's.

Inputs may be local paths or any URI Spark's Hadoop layer reads (hdfs://, s3a://, ...): jsonl
through `textFile` (splittable, .gz decompressed), parquet through `spark.read.parquet`, plain
text whole-file through `binaryFiles`. A local output path receives one file written from the
driver in input order (the local engine's bytes); a URI output receives Spark's directory of
part files. Token files are written by the executors: the output prefix must be a path they can
all reach (a local path in local mode, a shared file system on a cluster).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Iterator, Optional, Sequence

from megalm.data.corpus import RawRecord, check_inputs, file_kind, iter_raw
from megalm.data.errors import DataError


def is_uri(path: str) -> bool:
    return "://" in path


def spark_session(master: Optional[str] = None, app_name: str = "megalm"):
    """The active SparkSession, or a new one on `master` (default: what spark-submit set, else
    local[*]). A missing PySpark or Java is a DataError saying what to install."""
    try:
        from pyspark import SparkConf
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError("--engine spark needs PySpark: pip install 'megalm[spark]' (or pip install pyspark)") from None
    check_java()
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    elif not SparkConf().contains("spark.master"):
        builder = builder.master("local[*]")
    return builder.getOrCreate()


def check_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (java_home and os.path.isfile(os.path.join(java_home, "bin", "java"))):
        raise DataError("--engine spark needs Java 17 or newer, and none was found: install a JRE "
                        "(apt-get install openjdk-17-jre-headless) or set JAVA_HOME")


def _spark_failure(e: Exception) -> DataError:
    """A failed Spark job as one line: the Java or Python error that caused it."""
    lines = [line.strip().lstrip(": ") for line in str(e).splitlines() if line.strip()]
    cause = next((line for line in lines if line.startswith(("java.", "org.apache", "pyspark.", "DataError"))), None)
    return DataError(f"the Spark job failed: {cause or (lines[0] if lines else type(e).__name__)}")


def _run(action):
    """Run a Spark action, turning a failed job into a DataError."""
    try:
        return action()
    except DataError:
        raise
    except Exception as e:
        if type(e).__name__ in ("Py4JJavaError", "PythonException", "AnalysisException", "IllegalArgumentException",
                                "SparkRuntimeException", "SparkException"):
            raise _spark_failure(e) from None
        raise


def check_spark_inputs(inputs: Sequence[str]) -> None:
    """Local paths must exist (checked before Spark starts); URIs are Spark's to read."""
    local = [p for p in inputs if not is_uri(p)]
    if local or not inputs:
        check_inputs(local)


def read_records(spark, inputs: Sequence[str], text_sample_by: str):
    """An RDD of (ordinal, RawRecord) holding every record of `inputs` in input order."""
    check_spark_inputs(inputs)
    sc = spark.sparkContext
    parts = []
    for path in inputs:
        kind = file_kind(path)
        if kind == "json":
            lines = sc.textFile(path, use_unicode=False).zipWithIndex()
            parts.append(lines.filter(lambda item: item[0].strip()).map(
                lambda item, path=path: RawRecord(path, item[1] + 1, "json", item[0], len(item[0]) + 1)))
        elif kind == "parquet":
            rows = spark.read.parquet(path).rdd.zipWithIndex()
            parts.append(rows.map(lambda item, path=path: _row_record(path, item)))
        else:
            files = sc.binaryFiles(path)
            parts.append(files.flatMap(lambda item, path=path: _text_records(path, item[1], text_sample_by)))
    return sc.union(parts).zipWithIndex().map(lambda item: (item[1], item[0]))


def _row_record(path: str, item) -> RawRecord:
    row = item[0].asDict()
    return RawRecord(path, item[1] + 1, "row", row, sum(len(v) for v in row.values() if isinstance(v, str)))


def _text_records(path: str, content: bytes, text_sample_by: str) -> list:
    """A plain text file's records, cut by the local reader (it reads a file, so the bytes go
    through a temporary one with the same suffix, .gz included)."""
    suffix = ".txt.gz" if path.endswith(".gz") else ".txt"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(content)
        f.flush()
        records = list(iter_raw([f.name], text_sample_by))
    for record in records:
        record.source = path
    return records


# ---------------------------------------------------------------------------------------- cleaning

def _clean_partition(configs: tuple, items: Iterator) -> Iterator:
    from megalm.data.clean import DocumentCleaner

    cleaner = DocumentCleaner(*configs)
    for ordinal, raw in items:
        yield ordinal, cleaner.process(raw)


def _band_keys(num_perm: int, bands: int, items: Iterator) -> Iterator:
    from megalm.data.minhash import LSHIndex

    index = LSHIndex(num_perm, bands)
    for ordinal, signature in items:
        for key in index.band_keys(signature):
            yield key, ordinal


def _first_kept_removals(groups: Iterator, rule: str) -> Iterator:
    """(ordinal, rule) for every ordinal of a group but the smallest."""
    for _, ordinals in groups:
        for ordinal in sorted(ordinals)[1:]:
            yield ordinal, rule


def _near_duplicates(spark, survivors, config) -> list:
    """Ordinals the local LSH rule removes, found from the band buckets shared by several documents."""
    from megalm.data.minhash import LSHIndex

    signatures = survivors.mapValues(lambda outcome: outcome.signature)
    keys = signatures.mapPartitions(lambda items: _band_keys(config.minhash_num_perm, config.minhash_bands, items))
    candidates = keys.groupByKey().flatMap(lambda group: list(group[1]) if len(group[1]) > 1 else []).distinct()
    shared = _run(lambda: candidates.map(lambda ordinal: (ordinal, None)).join(signatures)
                  .map(lambda item: (item[0], item[1][1])).collect())
    index = LSHIndex(config.minhash_num_perm, config.minhash_bands, config.minhash_threshold)
    return [ordinal for ordinal, signature in sorted(shared, key=lambda item: item[0])
            if index.query_or_add(signature) is not None]


def _dedup_removals(spark, outcomes, config):
    """An RDD of (ordinal, "exact_duplicate" | "near_duplicate") for the documents the
    de-duplication steps remove."""
    sc = spark.sparkContext
    survivors = outcomes.filter(lambda item: item[1].rule is None)
    removals = sc.emptyRDD()
    if config.exact_dedup:
        exact = survivors.map(lambda item: (item[1].exact_hash, item[0])).groupByKey() \
            .mapPartitions(lambda groups: _first_kept_removals(groups, "exact_duplicate"))
        removals = removals.union(exact)
        exact_removed = exact.map(lambda item: (item[0], True))
        survivors = survivors.leftOuterJoin(exact_removed).filter(lambda item: item[1][1] is None) \
            .mapValues(lambda pair: pair[0])
    if config.near_dedup:
        near = _near_duplicates(spark, survivors, config)
        removals = removals.union(sc.parallelize([(ordinal, "near_duplicate") for ordinal in near], 1))
    return removals


def _merge_counts(a: dict, b: dict) -> dict:
    for key in ("documents", "kept", "invalid_utf8"):
        a[key] += b[key]
    for group in ("removed", "pii"):
        for name, n in b[group].items():
            a[group][name] = a[group].get(name, 0) + n
    return a


def clean_on_spark(spark, inputs: Sequence[str], output: str, config, quality=None, rejected: Optional[str] = None,
                   pii=None, filters=None, log=None) -> dict:
    """`clean.clean_corpus` on Spark: the same kept and removed documents, the same counts."""
    from pyspark import StorageLevel

    from megalm.data.clean import FATAL, check_config, count_outcome, new_counts, output_line
    from megalm.data.filters import FilterConfig
    from megalm.data.pii import PIIConfig
    from megalm.data.quality import QualityConfig

    log = log or (lambda message: print(message, file=sys.stderr))
    quality, pii, filters = quality or QualityConfig(), pii or PIIConfig(), filters or FilterConfig()
    check_config(config, quality, filters)
    configs = (config, quality, pii, filters)
    records = _run(lambda: read_records(spark, inputs, config.text_sample_by))
    outcomes = records.mapPartitions(lambda items: _clean_partition(configs, items)) \
        .persist(StorageLevel.MEMORY_AND_DISK)
    try:
        fatal = _run(lambda: outcomes.filter(lambda item: item[1].rule in FATAL).takeOrdered(1, key=lambda x: x[0]))
        if fatal:
            raise DataError(fatal[0][1].error)
        removals = _dedup_removals(spark, outcomes, config)
        decided = outcomes.mapValues(lambda outcome: _without_signature(outcome)).leftOuterJoin(removals) \
            .mapValues(lambda pair: (pair[0], pair[0].rule or pair[1])).sortByKey() \
            .persist(StorageLevel.MEMORY_AND_DISK)

        def add(counts, item):
            count_outcome(counts, *item[1])
            return counts

        counts = _run(lambda: decided.aggregate(new_counts(config, pii, filters), add, _merge_counts))
        removed = ", ".join(f"{rule} {n:,}" for rule, n in counts["removed"].items() if n)
        log(f"spark: {counts['documents']:,} documents in, {counts['kept']:,} kept; removed: {removed or 'none'}")
        lines = decided.map(lambda item: (item[1][1], output_line(*item[1]) if item[1][0].record is not None else None))
        _write_lines(lines.filter(lambda x: x[0] is None).values(), output)
        if rejected:
            _write_lines(lines.filter(lambda x: x[0] is not None and x[1] is not None).values(), rejected)
        decided.unpersist()
    finally:
        outcomes.unpersist()
    return counts


def _without_signature(outcome):
    """The outcome as the writer needs it (the signature has done its work and is large)."""
    outcome.signature = None
    outcome.exact_hash = None
    return outcome


def _write_lines(lines, path: str) -> None:
    """Lines in order into one local file (under a temporary name until complete), or a
    directory of part files for a URI."""
    if is_uri(path):
        _run(lambda: lines.map(lambda line: line.rstrip("\n")).saveAsTextFile(path))
        return
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in _run(lambda: lines.toLocalIterator()):
                f.write(line)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------- tokenizing

def _tokenize_partition(encoder_args: tuple, prefixes: dict, parts_dir: str, dtype, strict: bool,
                        index: int, items: Iterator) -> Iterator:
    """Write this partition's records to parts_dir/part-INDEX_KEY.bin/.idx; yield (index, stats,
    first fatal (ordinal, message) or None)."""
    from megalm.data.encode import RecordEncoder, add_encoded, new_stats
    from megalm.data.indexed_dataset import IndexedDatasetBuilder

    encoder = RecordEncoder(*encoder_args)
    builders = {key: IndexedDatasetBuilder(_part_prefix(parts_dir, index, key), dtype) for key in prefixes}
    stats, fatal = new_stats(), None
    try:
        for ordinal, raw in items:
            try:
                add_encoded(encoder.encode(raw), builders, stats, strict)
            except DataError as e:
                fatal = (ordinal, str(e))
                break
    finally:
        for builder in builders.values():
            builder.discard() if fatal else builder.finalize()
    yield index, stats, fatal


def _part_prefix(parts_dir: str, index: int, key: str) -> str:
    return os.path.join(parts_dir, f"part-{index:05d}_{key}")


def tokenize_on_spark(spark, inputs: Sequence[str], text_sample_by: str, encoder_args: tuple, prefixes: dict,
                      dtype, strict: bool) -> dict:
    """`tools/preprocess_data.py` on Spark: one dataset per partition, merged into `prefixes`
    ({key: output prefix}). Returns the same stats as the local engine."""
    from megalm.data.encode import new_stats
    from megalm.data.indexed_dataset import merge_datasets

    records = _run(lambda: read_records(spark, inputs, text_sample_by))
    first = next(iter(prefixes.values()))
    parts_dir = tempfile.mkdtemp(prefix=os.path.basename(first) + ".parts.", dir=os.path.dirname(first) or ".")
    try:
        results = _run(lambda: records.mapPartitionsWithIndex(
            lambda index, items: _tokenize_partition(encoder_args, prefixes, parts_dir, dtype, strict, index, items))
            .collect())
        fatal = sorted(r[2] for r in results if r[2] is not None)
        if fatal:
            raise DataError(fatal[0][1])
        stats = new_stats()
        for _, part, _ in results:
            for name in stats:
                stats[name] += part[name]
        indices = sorted(r[0] for r in results if r[1]["documents"])
        print(f"spark: {stats['documents']:,} documents, {stats['tokens']:,} tokens, {stats['malformed']:,} malformed "
              f"lines skipped; merging {len(indices)} partitions", file=sys.stderr)
        for key, prefix in prefixes.items():
            parts = [_part_prefix(parts_dir, index, key) for index in indices]
            if parts:
                merge_datasets(parts, prefix)
            else:
                _write_empty(prefix, dtype)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return stats


def _write_empty(prefix: str, dtype) -> None:
    from megalm.data.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix, dtype)
    builder.finalize()

