#!/usr/bin/env python
"""Data-tool throughput on the standard-library corpus: the quickstart chain, tool by tool.

    python tools/bench/preprocess.py [--max-mb 20] [--vocab-size 8192] [--workers 1 2]

Runs, as subprocesses exactly as a user would: make_stdlib_corpus.py -> clean_corpus.py ->
train_tokenizer.py (MegaBPE) -> preprocess_data.py, once per --workers value for the last, and
reports wall time per tool and preprocess_data.py's tokens/s in all and per worker.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name, *args):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=20.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timings = {}
        _, timings["make_stdlib_corpus"] = tool("make_stdlib_corpus.py", "--output", tmp / "stdlib.jsonl",
                                                "--max-mb", args.max_mb)
        line, timings["clean_corpus"] = tool("clean_corpus.py", "--input", tmp / "stdlib.jsonl", "--output",
                                             tmp / "clean.jsonl", "--no-quality", "--workers", max(args.workers),
                                             "--no-progress")
        kept = json.loads(line)["kept"]
        _, timings["train_tokenizer"] = tool("train_tokenizer.py", "--input", tmp / "clean.jsonl", "--vocab-size",
                                             args.vocab_size, "--output-dir", tmp / "tok", "--no-progress")
        rates = {}
        for workers in args.workers:
            line, timings[f"preprocess_data --workers {workers}"] = tool(
                "preprocess_data.py", "--input", tmp / "clean.jsonl", "--output-prefix", tmp / f"w{workers}",
                "--tokenizer-type", "MegaBPE", "--tokenizer-model", tmp / "tok", "--append-eod", "--workers",
                workers, "--no-progress")
            summary = json.loads(line)
            rates[workers] = summary["tokens_per_second"]
            print(f"preprocess_data.py --workers {workers}: {summary['tokens']:,} tokens, "
                  f"{summary['tokens_per_second']:,} tokens/s ({summary['tokens_per_second'] / workers:,.0f} "
                  f"per worker)", flush=True)
    print(f"clean_corpus kept {kept} documents")
    for name, seconds in timings.items():
        print(f"  {name:<32} {seconds:6.2f} s (wall, with interpreter start)")
    chain = timings["clean_corpus"] + timings["train_tokenizer"] + timings[f"preprocess_data --workers {max(args.workers)}"]
    print(f"  clean + train + preprocess       {chain:6.2f} s")
    print(json.dumps({"seconds": timings, "tokens_per_second": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
