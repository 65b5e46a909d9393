#!/usr/bin/env python
"""Write the Python standard library's own sources as a jsonl corpus: one {"text": ...} per file.

    python tools/make_stdlib_corpus.py --output stdlib.jsonl [--max-mb 20]
    python tools/make_stdlib_corpus.py --output stdlib.jsonl --held-out heldout.txt [--held-out-mb 0.2]

Every machine with Python has this corpus, so examples and benchmarks need no download. Files are
taken in sorted path order (site-packages and undecodable files are skipped) until --max-mb
megabytes of text are written. --held-out also writes the text that comes next, which the corpus
does not hold, as one plain text file (--held-out-mb of it): text to measure perplexity on.
"""

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.data.cli import run  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402


def stdlib_sources(max_bytes: int, skip_bytes: int = 0):
    """(path, text) of the standard library's .py files, up to max_bytes of UTF-8 in total. skip_bytes
    first passes over the files that stdlib_sources(skip_bytes) gives: the selection then follows it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped, written = 0, 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        size = len(text.encode("utf-8"))
        if skipped is not None and skipped + size <= skip_bytes:
            skipped += size
            continue
        skipped = None  # the skipped selection stops at its first file that does not fit, as any does
        if written + size > max_bytes:
            break
        written += size
        yield path, text


def held_out_text(max_bytes: int, after_bytes: int) -> str:
    """The first max_bytes of the sources that follow stdlib_sources(after_bytes), cut at a line end."""
    pieces, size = [], 0
    for _, text in stdlib_sources(sys.maxsize, after_bytes):
        pieces.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    data = "\n".join(pieces).encode("utf-8")[:max_bytes]
    return data[:data.rfind(b"\n") + 1].decode("utf-8")  # a newline byte never splits a character


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="jsonl file to write.")
    parser.add_argument("--max-mb", type=float, default=20.0, help="Stop after this many megabytes of text.")
    parser.add_argument("--held-out", help="Also write the sources that follow the corpus to this text file.")
    parser.add_argument("--held-out-mb", type=float, default=0.2, help="Megabytes of text for --held-out.")
    args = parser.parse_args(argv)
    max_bytes = int(args.max_mb * 1e6)
    held_out = held_out_text(int(args.held_out_mb * 1e6), max_bytes) if args.held_out else ""
    if args.held_out and not held_out:
        raise DataError(f"--max-mb {args.max_mb:g} takes all of the standard library's sources and leaves none "
                        f"for --held-out: lower --max-mb")
    outputs = [args.output] + ([args.held_out] if args.held_out else [])
    for path in outputs:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    # Both outputs go to temporary files first and are renamed only once both are complete.
    temporaries = [f"{path}.tmp{os.getpid()}" for path in outputs]
    count = size = 0
    try:
        with open(temporaries[0], "w", encoding="utf-8") as f:
            for _, text in stdlib_sources(max_bytes):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count += 1
                size += len(text.encode("utf-8"))
        if args.held_out:
            with open(temporaries[1], "w", encoding="utf-8") as f:
                f.write(held_out)
        for tmp, path in zip(temporaries, outputs):
            os.replace(tmp, path)
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"wrote {count} files, {size / 1e6:.1f} MB of text, to {args.output}")
    if args.held_out:
        print(f"wrote {len(held_out.encode('utf-8')) / 1e6:.1f} MB of the text that follows, held out of the corpus, "
              f"to {args.held_out}")
    return 0


if __name__ == "__main__":
    run(main)
