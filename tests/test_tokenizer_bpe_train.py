"""MegaBPE training: the C++ and Python loops agree merge for merge; the command-line tool."""

import json
import os
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from megalm.data import _native
from megalm.data.tokenizer.bpe import GPT4_PATTERN, ByteLevelBPETokenizer
from megalm.data.tokenizer.bpe_train import count_words, train_merges

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

needs_native = pytest.mark.skipif(_native.load("bpe") is None, reason="no C++ compiler / pybind11")


@pytest.fixture(scope="module")
def word_counts():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    texts += [json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl", encoding="utf-8")]
    return count_words(texts, GPT4_PATTERN)


@needs_native
def test_cpp_and_python_trainers_give_identical_merges(word_counts):
    native = train_merges(word_counts, 1500, use_native=True)
    python = train_merges(word_counts, 1500, use_native=False)
    assert len(native) == 1500
    assert native == python


@needs_native
@pytest.mark.parametrize("words", [
    {"aaaaaaa": 3, "aaa": 5, "ab": 2, "ba": 2},  # overlapping pairs of one symbol
    {"abab": 1, "baba": 1, "cdcd": 1, "dcdc": 1},  # every pair ties: order decides
    {"x": 10, "": 4, "xy": 1},  # words too short to merge, and rare pairs
    {"héllo wörld 中文": 7, "中文中文": 2},  # multi-byte characters
])
def test_tie_breaking_and_edge_cases_agree(words):
    for min_frequency in (1, 2):
        native = train_merges(words, 50, min_frequency, use_native=True)
        assert native == train_merges(words, 50, min_frequency, use_native=False)


def test_most_frequent_pair_first_smallest_pair_on_ties():
    merges = train_merges({"abab": 1, "cdcd": 1}, 10, min_frequency=1, use_native=False)
    # (a, b) and (c, d) occur twice each; (b, a) and (d, c) once: the smaller pair wins ties.
    assert merges[:2] == [(ord("a"), ord("b")), (ord("c"), ord("d"))]


def test_min_frequency_stops_training():
    assert train_merges({"ab": 1, "cd": 1}, 10, min_frequency=2, use_native=False) == []


@needs_native
def test_native_and_python_encoders_agree(word_counts):
    merges = train_merges(word_counts, 700)
    tokenizer = ByteLevelBPETokenizer.from_merges(merges, "gpt4", ["<|endoftext|>"])
    assert tokenizer._native is not None
    words = list(word_counts)[:3000] + ["aaaaaaaaaaaa", "中文中文", " " * 50]
    native = [tokenizer._encode_word(w.encode("utf-8")) for w in words]
    tokenizer._native = None
    assert native == [tokenizer._encode_word(w.encode("utf-8")) for w in words]


def test_training_without_a_compiler_matches(tmp_path):
    """MEGALM_NO_JIT=1 (and no prebuilt module) gives the Python fallback the same merges."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((DATA / "zh_sample.jsonl").read_text(encoding="utf-8") * 3, encoding="utf-8")
    out = {}
    for flag in ("0", "1"):
        env = dict(os.environ, MEGALM_NO_JIT=flag)
        code = ("import sys, json; from megalm.data import _native; "
                "from megalm.data.tokenizer.bpe_train import train_bpe; "
                "t = train_bpe([open(sys.argv[1]).read()], 700); "
                "print(json.dumps([_native.load('bpe') is not None, t.merges]))")
        result = subprocess.run([sys.executable, "-c", code, str(corpus)], env=env, cwd=ROOT,
                                capture_output=True, text=True, check=True)
        out[flag] = json.loads(result.stdout)
    if not out["1"][0]:
        assert out["0"][1] == out["1"][1]


def run_tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--no-progress", *args],
                          cwd=cwd, capture_output=True, text=True)


def test_train_tokenizer_tool_writes_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl", encoding="utf-8")]
    texts += [Counter.__doc__ or "", json.__doc__ or ""]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    result = run_tool("--input", str(corpus), "--vocab-size", "400", "--output-dir", str(tmp_path / "tok"),
                      "--workers", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["vocab_size"] <= 400 and summary["eod"] == summary["vocab_size"] - 1
    from megalm.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer("MegaBPE", str(tmp_path / "tok"))
    assert tokenizer.decode(tokenizer.encode(texts[0])) == texts[0]


def test_train_tokenizer_tool_sentencepiece(tmp_path):
    pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl")) * 4)
    result = run_tool("--input", str(corpus), "--vocab-size", "1000", "--output-dir", str(tmp_path / "sp"),
                      "--tokenizer-type", "SentencePiece")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sp" / "tokenizer.model").exists()


def test_train_tokenizer_tool_user_errors_are_one_line(tmp_path):
    result = run_tool("--input", str(tmp_path / "missing.jsonl"), "--vocab-size", "300", "--output-dir",
                      str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --input {tmp_path / 'missing.jsonl'}: no such file"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"body": "x"}\n')
    result = run_tool("--input", str(corpus), "--vocab-size", "300", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "no key 'text'" in result.stderr and "Traceback" not in result.stderr
    result = run_tool("--input", str(corpus), "--vocab-size", "100", "--output-dir", str(tmp_path),
                      "--json-keys", "body")
    assert result.returncode == 2 and "too small" in result.stderr
