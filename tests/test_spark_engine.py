"""--engine spark: the same kept documents, reasons, counts and token files as the local engine,
on a real local Spark session (local[2], one per module: starting Spark takes tens of seconds)."""

import filecmp
import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megalm.data import spark_engine
from megalm.data.errors import DataError
from megalm.data.indexed_dataset import IndexedDataset
from megalm.data.tokenizer.bpe_train import train_bpe

ROOT = Path(__file__).resolve().parents[1]
HAN = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没"
WORDS = ("river mill village summer children swim pools weir autumn farmers apples cider families streets "
         "train city fair parade the of and to that with have be").split()


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spark_missing() -> str:
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install -r requirements-dev.txt installs it)"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java runtime (Spark needs Java 17+: apt-get install openjdk-17-jre-headless)"
    return ""


needs_spark = pytest.mark.skipif(bool(spark_missing()), reason=spark_missing() or "-")


@pytest.fixture(scope="module")
def spark():
    # Executors are fresh Python processes: they must import this checkout's megalm.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([old] if old else []))
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("megalm-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.default.parallelism", "2").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def corpus(directory: Path) -> list:
    """Two inputs (jsonl, gzipped plain text) holding every kind of outcome: near and exact
    duplicates in English and Chinese, PII, a blocked URL, a bad word, a malformed line, an empty
    document."""
    rng = random.Random(0)
    english = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) for _ in range(30)]
    chinese = ["".join(rng.choice(HAN) for _ in range(rng.randint(80, 160))) for _ in range(30)]
    texts = english + chinese
    texts += [t.replace("river", "brook", 1) + " mill" for t in english[:10]]
    texts += [t[:40] + rng.choice(HAN) + t[41:] for t in chinese[:10]]
    texts += texts[:3] + ["  ", "Mail jane@corp.com or call +1 (415) 555-2671. " + english[20][::-1],
                          "我的手机号是13812345678。" + chinese[25][::-1], "a darn " + english[21][::-1]]
    records = [{"id": i, "text": t} for i, t in enumerate(texts)]
    records[5]["url"] = "https://www.blocked.example/page"
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(40, "{not json")
    (directory / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(directory / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join([english[0], "A new paragraph " + english[7][::-1], chinese[3]]) + "\n")
    (directory / "blocked.txt").write_text("blocked.example\n")
    (directory / "en.txt").write_text("darn\n")
    return [str(directory / "a.jsonl"), str(directory / "b.txt.gz")]


@needs_spark
def test_clean_matches_local_engine(spark, tmp_path, capsys):
    inputs = corpus(tmp_path)
    tool = load_tool("clean_corpus")
    common = ["--input", *inputs, "--no-progress", "--url-blocklist", str(tmp_path / "blocked.txt"),
              "--bad-words", f"en={tmp_path}/en.txt", "--min-words", "20", "--min-stop-words", "0"]
    summaries = {}
    for engine in ("local", "spark"):
        assert tool.main([*common, "--output", str(tmp_path / f"{engine}.jsonl"),
                          "--rejected", str(tmp_path / f"{engine}_rejected.jsonl"), "--engine", engine]) == 0
        summaries[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for summary in summaries.values():
        summary.pop("seconds")
    assert summaries["spark"] == summaries["local"]
    removed = summaries["local"]["removed"]
    assert removed["near_duplicate"] >= 18 and removed["exact_duplicate"] == 5  # 3 repeats, 2 in b.txt.gz
    assert removed["malformed"] == 1 and removed["url_blocklist"] == 1 and removed["bad_words"] == 1
    assert summaries["local"]["pii"]["email"] == 1 and summaries["local"]["pii"]["cn_mobile"] == 1
    assert filecmp.cmp(tmp_path / "local.jsonl", tmp_path / "spark.jsonl", shallow=False)
    assert filecmp.cmp(tmp_path / "local_rejected.jsonl", tmp_path / "spark_rejected.jsonl", shallow=False)


@needs_spark
def test_tokenize_matches_local_engine_byte_for_byte(spark, tmp_path, capsys):
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(150)]
    texts += ["".join(rng.choice(HAN) for _ in range(30)) for _ in range(20)]
    lines = [json.dumps({"text": t, "title": t[:12]}, ensure_ascii=False) for t in texts]
    lines.insert(7, "not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe(texts, 400).save(str(tmp_path / "tokenizer.json"))
    tool = load_tool("preprocess_data")
    common = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "MegaBPE", "--tokenizer-model", str(tmp_path),
              "--json-keys", "text", "title", "--append-eod", "--no-progress"]
    for engine in ("local", "spark"):
        assert tool.main([*common, "--output-prefix", str(tmp_path / engine), "--engine", engine]) == 0
    local_summary, spark_summary = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    for key in ("documents", "tokens", "malformed"):
        assert spark_summary[key] == local_summary[key]
    for key in ("text", "title"):
        for suffix in (".bin", ".idx"):
            assert filecmp.cmp(tmp_path / f"local_{key}_document{suffix}", tmp_path / f"spark_{key}_document{suffix}",
                               shallow=False)
    assert len(IndexedDataset(str(tmp_path / "spark_text_document"))) == len(texts)
    assert not list(tmp_path.glob("*.parts.*")), "the per-partition files are removed"
    # A record without the key stops the run with its line, as on the local engine.
    with pytest.raises(DataError, match=r"in.jsonl:1: no key 'body'"):
        tool.main([*common[:6], "--json-keys", "body", "--output-prefix", str(tmp_path / "bad"), "--engine", "spark"])
    assert not list(tmp_path.glob("bad*"))


def test_missing_pyspark_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(DataError, match=r"pip install 'megalm\[spark\]'"):
        spark_engine.spark_session()


def test_missing_java_names_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(DataError, match="needs Java 17 or newer.*openjdk-17-jre-headless"):
        spark_engine.check_java()


@needs_spark
def test_uri_output_is_a_directory_of_parts_in_order(spark, tmp_path):
    from megalm.data.clean import CleanConfig, clean_corpus

    inputs = corpus(tmp_path)
    clean_corpus(inputs, str(tmp_path / "local.jsonl"), CleanConfig())
    spark_engine.clean_on_spark(spark, [f"file://{path}" for path in inputs], f"file://{tmp_path}/parts",
                                CleanConfig(), log=lambda message: None)
    parts = sorted((tmp_path / "parts").glob("part-*"))
    assert parts and (tmp_path / "parts" / "_SUCCESS").exists()
    assert "".join(p.read_text(encoding="utf-8") for p in parts) == (tmp_path / "local.jsonl").read_text(encoding="utf-8")


@needs_spark
def test_unreadable_uri_is_one_error(spark, tmp_path):
    from megalm.data.clean import CleanConfig

    with pytest.raises(DataError, match=r"the Spark job failed: .*(does not exist|not found)"):
        spark_engine.clean_on_spark(spark, [f"file://{tmp_path}/missing.jsonl"], str(tmp_path / "out.jsonl"),
                                    CleanConfig())
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("tool", ["clean_corpus", "preprocess_data"])
def test_missing_local_input_fails_before_spark_starts(tmp_path, tool):
    extra = ["--output", str(tmp_path / "out.jsonl")] if tool == "clean_corpus" else \
        ["--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--engine", "spark", "--input",
                             str(tmp_path / "missing.jsonl"), *extra], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --input {tmp_path / 'missing.jsonl'}: no such file"
