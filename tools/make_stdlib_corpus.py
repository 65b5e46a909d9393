#!/usr/bin/env python
"""Write the Python standard library's own sources as a jsonl corpus: one {"text": ...} per file.

    python tools/make_stdlib_corpus.py --output stdlib.jsonl [--max-mb 20]

Every machine with Python has this corpus, so examples and benchmarks need no download. Files are
taken in sorted path order (site-packages and undecodable files are skipped) until --max-mb
megabytes of text are written.
"""

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.data.cli import run  # noqa: E402


def stdlib_sources(max_bytes: int):
    """(path, text) of the standard library's .py files, up to max_bytes of UTF-8 in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    written = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        size = len(text.encode("utf-8"))
        if written + size > max_bytes:
            break
        written += size
        yield path, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="jsonl file to write.")
    parser.add_argument("--max-mb", type=float, default=20.0, help="Stop after this many megabytes of text.")
    args = parser.parse_args(argv)
    if os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = f"{args.output}.tmp{os.getpid()}"
    count = size = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for _, text in stdlib_sources(int(args.max_mb * 1e6)):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count += 1
                size += len(text.encode("utf-8"))
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {count} files, {size / 1e6:.1f} MB of text, to {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
