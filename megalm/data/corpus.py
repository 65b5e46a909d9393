"""Reading raw corpora: jsonl, plain text and parquet, streamed record by record.

Reading is split in two so that parsing can happen in worker processes: `iter_raw` yields cheap
`RawRecord`s (the bytes of a jsonl line, a text block, or a parquet row) in the main process,
and `parse_record` turns one into a dict in a worker, raising `RecordError` for a malformed line or
a missing key, with the file and line number.

Bytes that are not UTF-8 are read as lone surrogates ("surrogateescape", so each document keeps
track of its own) and `parse_record` replaces them with U+FFFD, as it does JSON escapes of
unpaired surrogates (``"\\udcff"``): neither could be written out as UTF-8. It says whether it did,
so the tools can count the documents affected.

File kinds go by extension: ``.jsonl`` / ``.json`` / ``.ndjson`` (one JSON object per line),
``.parquet``, anything else is plain text; a trailing ``.gz`` is decompressed on the fly. Plain
text is cut into documents per `text_sample_by`: ``line``, ``paragraph`` (blocks separated by
blank lines; the default) or ``document`` (the whole file). A truncated or corrupt compressed file
raises `DataError` when reading reaches the damage.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from megalm.data.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


@dataclass
class RawRecord:
    source: str
    line: int  # 1-based line (jsonl, text) or row (parquet) number
    kind: str  # "json" | "text" | "row"
    payload: Any  # bytes (json), str (text) or dict (row)
    size: int  # bytes read, for throughput


class RecordError(ValueError):
    """A record that cannot be used; `kind` is "malformed" or "missing_key"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def file_kind(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def check_inputs(paths: Sequence[str], flag: str = "--input") -> None:
    if not paths:
        raise DataError(f"no input files: give {flag} FILE [FILE ...]")
    for path in paths:
        if os.path.isdir(path):
            raise DataError(f"{flag} {path} is a directory: give the files in it ({flag} {path}/*.jsonl)")
        if not os.path.isfile(path):
            raise DataError(f"{flag} {path}: no such file")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_raw(paths: Sequence[str], text_sample_by: str = "paragraph") -> Iterator[RawRecord]:
    """Every record of every file, in order."""
    if text_sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"--text-sample-by {text_sample_by!r}: choose one of {', '.join(TEXT_SAMPLE_BY)}")
    for path in paths:
        kind = file_kind(path)
        if kind == "json":
            records = _iter_jsonl(path)
        elif kind == "parquet":
            records = _iter_parquet(path)
        else:
            records = _iter_text(path, text_sample_by)
        yield from _checked_stream(path, records)


# What gzip / zlib raise for a cut or damaged stream: EOFError when the file ends before the
# end-of-stream marker, zlib.error for bad deflate data, BadGzipFile for a bad header or CRC.
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _checked_stream(path: str, records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    """`records`, with a damaged compressed stream turned into one DataError naming the file. The
    error surfaces in the middle of the file, so every consumer must drop what it wrote (the
    tools write under temporary names)."""
    n = 0
    try:
        for record in records:
            yield record
            n += 1
    except _STREAM_ERRORS as e:
        raise DataError(f"{path} is truncated or corrupt ({e}; after {n:,} records): re-create or re-download "
                        f"it (gzip -t tests a .gz file)") from None


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    with _open_binary(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield RawRecord(path, n, "json", line, len(line))


def _iter_text(path: str, sample_by: str) -> Iterator[RawRecord]:
    with _open_binary(path) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        if sample_by == "document":
            text = f.read()
            if text.strip():
                yield RawRecord(path, 1, "text", text, len(text.encode("utf-8", errors="surrogateescape")))
            return
        block, start = [], 1
        for n, line in enumerate(f, 1):
            if sample_by == "line":
                if line.strip():
                    yield RawRecord(path, n, "text", line.rstrip("\r\n"), len(line))
                continue
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                text = "".join(block).rstrip("\r\n")
                yield RawRecord(path, start, "text", text, len(text))
                block = []
        if block:
            text = "".join(block).rstrip("\r\n")
            yield RawRecord(path, start, "text", text, len(text))


def _iter_parquet(path: str) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for foreign files
        raise DataError(f"{path} is not a readable parquet file: {e}") from None
    n = 0
    for batch in reader.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            size = sum(len(v) for v in row.values() if isinstance(v, str))
            yield RawRecord(path, n, "row", row, size)


def parse_record(raw: RawRecord, keys: Sequence[str]) -> tuple[dict, bool]:
    """The record as a dict holding string values for every key of `keys`, and whether invalid
    UTF-8 in it was replaced with U+FFFD. Plain text records become ``{key: text}`` for the first
    key."""
    if raw.kind == "text":
        text, replaced = replace_invalid_unicode(raw.payload)
        return {keys[0]: text}, replaced
    record, replaced = _parse_json(raw) if raw.kind == "json" else (raw.payload, False)
    for key in keys:
        if key not in record:
            raise RecordError("missing_key", f"{raw.source}:{raw.line}: no key {key!r} (keys: "
                                             f"{', '.join(map(str, list(record)[:8]))}); choose with --json-keys")
        if not isinstance(record[key], str):
            raise RecordError("malformed", f"{raw.source}:{raw.line}: {key!r} is a "
                                           f"{type(record[key]).__name__}, not a string")
    return record, replaced


def _parse_json(raw: RawRecord) -> tuple[dict, bool]:
    try:
        text = raw.payload.decode("utf-8")
        # Strict decoding leaves JSON escapes of unpaired surrogates (\udcff) as the only source
        # of lone surrogates; paired ones (emoji) also match, and the check below finds nothing.
        suspect = "\\ud" in text or "\\uD" in text
    except UnicodeDecodeError:
        text, suspect = raw.payload.decode("utf-8", errors="surrogateescape"), True
    try:
        record = json.loads(text.removeprefix("\ufeff"))  # a byte-order mark may open the file
    except ValueError as e:
        raise RecordError("malformed", f"{raw.source}:{raw.line}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RecordError("malformed", f"{raw.source}:{raw.line}: a JSON {type(record).__name__}, not an object")
    return replace_invalid_unicode(record) if suspect else (record, False)


# surrogateescape reads byte b >= 0x80 that is not UTF-8 as U+DC00 + b.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_valid_unicode(text: str) -> bool:
    """No lone surrogate: UTF-8 encoding fails only on one, and is several times faster than a
    regex scan."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_escaped(match: re.Match) -> str:
    # Decoding the bytes again with errors="replace" gives one U+FFFD per maximal invalid
    # sequence (the Unicode standard's practice), as reading with errors="replace" would.
    return match.group().encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def replace_invalid_unicode(value: Any) -> tuple[Any, bool]:
    """`value` with every lone surrogate in its strings (dict keys and values, list items,
    recursively) replaced by U+FFFD, and whether there was one."""
    found = False

    def fix(item):
        nonlocal found
        if isinstance(item, str):
            if _is_valid_unicode(item):
                return item
            item, escaped = _ESCAPED_BYTES.subn(_decode_escaped, item)
            item, lone = _LONE_SURROGATE.subn("\ufffd", item)
            found = found or escaped + lone > 0
            return item
        if isinstance(item, dict):
            return {fix(k): fix(v) for k, v in item.items()}
        if isinstance(item, list):
            return [fix(v) for v in item]
        return item

    return fix(value), found


def invalid_utf8_note(documents: int) -> str:
    """The tools' report line for documents whose invalid bytes `parse_record` replaced."""
    return f"{documents:,} document{'' if documents == 1 else 's'} had invalid UTF-8 bytes (replaced with U+FFFD)"


def iter_texts(paths: Sequence[str], key: str = "text", text_sample_by: str = "paragraph") -> Iterator[str]:
    """The text under `key` of every usable record (malformed ones are skipped; a missing key
    is an error)."""
    for raw in iter_raw(paths, text_sample_by):
        try:
            yield parse_record(raw, [key])[0][key]
        except RecordError as e:
            if e.kind == "missing_key":
                raise DataError(str(e)) from None
