"""tools/make_stdlib_corpus.py: the corpus, and the held-out text that follows it and that it does
not hold."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from make_stdlib_corpus import stdlib_sources  # noqa: E402


def make_corpus(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_stdlib_corpus.py"), *args],
                          capture_output=True, text=True)


def test_held_out_text_is_the_text_after_the_corpus(tmp_path):
    corpus, held_out = tmp_path / "raw.jsonl", tmp_path / "heldout.txt"
    r = make_corpus("--output", str(corpus), "--max-mb", "0.3", "--held-out", str(held_out), "--held-out-mb", "0.1")
    assert r.returncode == 0, r.stderr
    trained = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert trained == [text for _, text in stdlib_sources(int(0.3e6))]
    following = "\n".join(text for _, text in list(stdlib_sources(int(2e6)))[len(trained):]).encode("utf-8")
    first = following[:100_000]
    assert held_out.read_bytes() == first[:first.rfind(b"\n") + 1]  # cut at the last line end within 0.1 MB
    assert r.stdout.splitlines()[-1] == f"wrote 0.1 MB of the text that follows, held out of the corpus, to {held_out}"


def test_no_text_left_for_held_out_is_one_error_and_keeps_earlier_outputs(tmp_path):
    corpus, held_out = tmp_path / "raw.jsonl", tmp_path / "heldout.txt"
    corpus.write_text("earlier corpus")
    held_out.write_text("earlier held-out text")
    r = make_corpus("--output", str(corpus), "--max-mb", "1000", "--held-out", str(held_out))  # the whole library
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("error: --max-mb 1000 takes all of the standard library's sources and leaves none for "
                        "--held-out: lower --max-mb\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout.txt", "raw.jsonl"]
    assert corpus.read_text() == "earlier corpus" and held_out.read_text() == "earlier held-out text"
