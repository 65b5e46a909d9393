"""tools/preprocess_data.py and tools/merge_datasets.py end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megalm.data.tokenizer.bpe_train import train_bpe

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    texts = [json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl", encoding="utf-8")]
    texts += [f"Document number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(200)]
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t, "title": t[:10]}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    tokenizer = train_bpe(texts, 600)
    tokenizer.save(str(directory / "tokenizer.json"))
    return path, texts, tokenizer


def preprocess(corpus_path, prefix, *extra, tokenizer_dir=None):
    return tool("preprocess_data.py", "--input", str(corpus_path), "--output-prefix", str(prefix),
                "--tokenizer-type", "MegaBPE", "--tokenizer-model", str(tokenizer_dir or corpus_path.parent),
                "--no-progress", *extra)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_end_to_end(corpus, tmp_path, workers):
    path, texts, tokenizer = corpus
    result = preprocess(path, tmp_path / "out", "--append-eod", "--workers", workers, "--json-keys", "text", "title")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["documents"] == len(texts) and summary["malformed"] == 0
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    for i in (0, 5, 100):
        assert ds[i].tolist() == tokenizer.encode(texts[i]) + [tokenizer.eod]
    titles = IndexedDataset(str(tmp_path / "out_title_document"))
    assert titles[3].tolist() == tokenizer.encode(texts[3][:10]) + [tokenizer.eod]
    assert summary["tokens"] == ds.num_tokens + titles.num_tokens


def test_large_vocabulary_uses_int32(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n\n70000 5\n")
    result = tool("preprocess_data.py", "--input", str(path), "--output-prefix", str(tmp_path / "n"),
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "100000", "--append-eod", "--no-progress")
    assert result.returncode == 0, result.stderr
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert ds.dtype == np.int32 and [ds[0].tolist(), ds[1].tolist()] == [[1, 2, 3, 99999], [70000, 5, 99999]]


def test_malformed_lines_are_skipped_and_counted_or_fatal(corpus, tmp_path):
    _, texts, _ = corpus
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good one"}\n{"text": broken\n[1, 2]\n{"text": "good two"}\n')
    result = preprocess(path, tmp_path / "out", tokenizer_dir=corpus[0].parent)
    assert result.returncode == 0 and "skipped 2 malformed lines" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["malformed"] == 2
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2
    result = preprocess(path, tmp_path / "strict", "--strict", tokenizer_dir=corpus[0].parent)
    assert result.returncode == 2 and f"{path}:2: not valid JSON" in result.stderr
    assert not list(tmp_path.glob("strict*"))


def test_missing_key_reports_the_line(corpus, tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    result = preprocess(path, tmp_path / "out", tokenizer_dir=corpus[0].parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:3: no key 'text' (keys: body); choose with --json-keys" in result.stderr
    assert not list(tmp_path.glob("out*"))


def test_user_errors_are_one_line(tmp_path):
    result = tool("preprocess_data.py", "--input", str(tmp_path / "none.jsonl"), "--output-prefix",
                  str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --input")
    (tmp_path / "x.jsonl").write_text('{"text": "1"}\n')
    result = tool("preprocess_data.py", "--input", str(tmp_path / "x.jsonl"), "--output-prefix",
                  str(tmp_path / "o"), "--tokenizer-type", "MegaBPE", "--tokenizer-model", str(tmp_path / "t"))
    assert result.returncode == 2 and "--tokenizer-model" in result.stderr and len(result.stderr.splitlines()) == 1
    result = tool("preprocess_data.py", "--input", str(tmp_path / "x.jsonl"), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--threads", "2")
    assert result.returncode == 2 and result.stderr == ("error: unrecognized arguments: --threads 2 (see "
                                                        "preprocess_data.py --help)\n")
    result = tool("preprocess_data.py", "--input", str(tmp_path / "x.jsonl"), "--output-prefix", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr == ("error: the following arguments are required: "
                                                        "--tokenizer-type (see preprocess_data.py --help)\n")
    result = tool("merge_datasets.py", "--input", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr == ("error: the following arguments are required: "
                                                        "--output-prefix (see merge_datasets.py --help)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


def test_invalid_utf8_is_replaced_and_counted(corpus, tmp_path):
    _, _, tokenizer = corpus
    path = tmp_path / "raw.txt"
    path.write_bytes(b"the quick fox\n\nthe lazy \xff dog\n\nthe end\n")
    result = preprocess(path, tmp_path / "out", tokenizer_dir=corpus[0].parent)
    assert result.returncode == 0, result.stderr
    assert "1 document had invalid UTF-8 bytes (replaced with U+FFFD)" in result.stderr.splitlines()
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["invalid_utf8"] == 1 and summary["documents"] == 3
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds[1].tolist() == tokenizer.encode("the lazy \ufffd dog")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_gzip_input_is_one_error(corpus, tmp_path, workers):
    """tests/data/truncated.jsonl.gz is a gzip stream cut at 60%: 85 whole records, then EOF. The
    outputs of an earlier run under the same prefix survive."""
    for suffix in (".bin", ".idx"):
        (tmp_path / f"out_text_document{suffix}").write_bytes(b"earlier run")
    path = DATA / "truncated.jsonl.gz"
    result = preprocess(path, tmp_path / "out", "--workers", workers, tokenizer_dir=corpus[0].parent)
    assert result.returncode == 2 and result.stderr == (
        f"error: {path} is truncated or corrupt (Compressed file ended before the end-of-stream marker was "
        f"reached; after 85 records): re-create or re-download it (gzip -t tests a .gz file)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_text_document.bin", "out_text_document.idx"]
    assert (tmp_path / "out_text_document.bin").read_bytes() == b"earlier run"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interrupted_run_leaves_no_final_files(corpus, tmp_path, monkeypatch):
    path, _, _ = corpus
    preprocess_data = load_tool("preprocess_data")
    calls = []

    def interrupt(self, tokens):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        IndexedDatasetBuilder.add_item(self, tokens)
        IndexedDatasetBuilder.end_document(self)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess_data.main(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                              "MegaBPE", "--tokenizer-model", str(path.parent), "--no-progress"])
    assert list(tmp_path.iterdir()) == []


def test_interrupted_subprocess_leaves_no_final_files(tmp_path):
    """A tokenizer failure in the middle of the input stops the run without output files."""
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n" * 5000 + "not-an-id\n")
    result = tool("preprocess_data.py", "--input", str(path), "--output-prefix", str(tmp_path / "n"),
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--text-sample-by", "line",
                  "--workers", "2", "--no-progress")
    assert result.returncode == 2 and f"{path}:5001: NullTokenizer reads space-separated integer ids" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt"]


def test_merge_tool(corpus, tmp_path):
    path, texts, _ = corpus
    assert preprocess(path, tmp_path / "a").returncode == 0
    assert preprocess(path, tmp_path / "b").returncode == 0
    result = tool("merge_datasets.py", "--input", str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document"),
                  "--output-prefix", str(tmp_path / "merged" / "ab"))
    assert result.returncode == 0, result.stderr
    merged = IndexedDataset(str(tmp_path / "merged" / "ab"))
    single = IndexedDataset(str(tmp_path / "a_text_document"))
    assert len(merged) == 2 * len(texts)
    np.testing.assert_array_equal(merged[len(texts) + 4], single[4])
    result = tool("merge_datasets.py", "--input", str(tmp_path), "--output-prefix", str(tmp_path / "all"))
    assert result.returncode == 0 and len(IndexedDataset(str(tmp_path / "all"))) == 2 * len(texts)
    result = tool("merge_datasets.py", "--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "x"))
    assert result.returncode == 2 and "not found" in result.stderr
