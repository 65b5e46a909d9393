#!/usr/bin/env python
"""Near-duplicate detection benchmark: megalm (local and Spark engines) against `datasketch` and
`datatrove`, English and Chinese separately, one run.

    python tools/bench/dedup.py [--max-mb 3] [--chinese-docs 3000] [--copies 0.2] [--spark-master local[2]]

Documents. English: the Python standard library's sources (documents of 50 words or more).
Chinese: synthetic short literary texts (60-300 characters drawn from the 500 most common
characters with Zipf frequencies, punctuation every 5-15 characters); no network needed. A
fraction (--copies) of the documents get a lightly edited copy appended: 1% of the words
replaced (English), 2% of the characters substituted, deleted or inserted (Chinese). Flagging a
planted copy is a hit; recall = hits / planted, precision = hits / flagged (natural near
duplicates among the stdlib files count against precision for everyone alike).

Contestants, each given the same documents in the same order, 112 permutations in 14 bands x 8 rows:
- megalm local: `clean_corpus` with only near-dedup on (no quality, exact dedup, PII), --workers;
- megalm Spark: `clean_on_spark`, the same flags, on --spark-master (start-up timed apart);
- datasketch MinHashLSH on megalm's shingles (same sets), with megalm's confirmation rule;
- datatrove's MinHash pipeline (signatures, buckets, clusters, filter; its own word tokenizer
  per language, word 5-grams; needs spaCy), if installed.
Reported: documents/s of each, ratios to megalm local, recall and precision.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from megalm.data.clean import CleanConfig, clean_corpus  # noqa: E402
from megalm.data.minhash import MinHasher  # noqa: E402
from megalm.data.pii import PIIConfig  # noqa: E402
from tools.make_stdlib_corpus import stdlib_sources  # noqa: E402

HAN = ("的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能"
       "好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意"
       "进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海"
       "口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难"
       "神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许"
       "八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往"
       "展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德"
       "收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志"
       "飞观争究包组造落视济喜离虽坏兴切底群")
PUNCTUATION = "，。；、！？"


def english_documents(max_mb: float, rng: random.Random) -> list:
    return [text for _, text in stdlib_sources(int(max_mb * 1e6)) if len(text.split()) >= 50]


def chinese_documents(count: int, rng: random.Random) -> list:
    weights = 1.0 / np.arange(1, len(HAN) + 1)
    chars = list(HAN)
    docs = []
    for _ in range(count):
        n = rng.randint(60, 300)
        out = []
        while len(out) < n:
            out.extend(rng.choices(chars, weights=weights, k=rng.randint(5, 15)))
            out.append(rng.choice(PUNCTUATION))
        docs.append("".join(out[:n]))
    return docs


def edit_english(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    real = [j for j, w in enumerate(words) if w.strip()]
    for j in rng.sample(real, max(1, len(real) // 100)):
        words[j] = "edited"
    return " ".join(words)


def edit_chinese(text: str, rng: random.Random) -> str:
    chars = list(text)
    for i in sorted(rng.sample(range(len(chars)), max(1, round(0.02 * len(chars)))), reverse=True):
        op = rng.random()
        if op < 0.5:
            chars[i] = rng.choice(HAN)
        elif op < 0.75:
            del chars[i]
        else:
            chars.insert(i, rng.choice(HAN))
    return "".join(chars)


def plant(texts: list, edit, copies: float, rng: random.Random) -> tuple:
    """Texts with edited copies appended; the set of the copies' indices."""
    texts = list(texts)
    planted = set()
    for i in rng.sample(range(len(texts)), int(copies * len(texts))):
        planted.add(len(texts))
        texts.append(edit(texts[i], rng))
    return texts, planted


def near_dedup_only(threshold: float) -> tuple:
    config = CleanConfig(exact_dedup=False, quality=False, minhash_threshold=threshold)
    pii = PIIConfig(redact_email=False, redact_ip=False, redact_phone=False, redact_cn_id=False, redact_cn_mobile=False)
    return config, pii


def flagged_from_output(path: str, n: int) -> np.ndarray:
    kept = np.zeros(n, dtype=bool)
    with open(path, encoding="utf-8") as f:
        for line in f:
            kept[json.loads(line)["id"]] = True
    return ~kept


def run_megalm_local(data: str, n: int, workdir: str, threshold: float, workers: int) -> np.ndarray:
    config, pii = near_dedup_only(threshold)
    out = os.path.join(workdir, "local.jsonl")
    clean_corpus([data], out, config, workers=workers, pii=pii)
    return flagged_from_output(out, n)


def run_megalm_spark(spark, data: str, n: int, workdir: str, threshold: float) -> np.ndarray:
    from megalm.data.spark_engine import clean_on_spark

    config, pii = near_dedup_only(threshold)
    out = os.path.join(workdir, "spark.jsonl")
    clean_on_spark(spark, [data], out, config, pii=pii, log=lambda message: None)
    return flagged_from_output(out, n)


def run_datasketch(texts: list, threshold: float) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    hasher = MinHasher(5, 112)
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    signatures, flagged = {}, []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=112)
        m.update_batch([int(h).to_bytes(8, "little") for h in set(hasher.shingles(text).tolist())])
        # Same confirmation rule as megalm's: the estimated Jaccard must reach the threshold.
        duplicate = any(m.jaccard(signatures[c]) >= threshold for c in lsh.query(m))
        flagged.append(duplicate)
        if not duplicate:
            lsh.insert(i, m)
            signatures[i] = m
    return np.array(flagged)


def run_datatrove(texts: list, language: str, workdir: str) -> np.ndarray:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import minhash
    from datatrove.utils.hashing import HashConfig
    from loguru import logger

    logger.remove()  # datatrove logs every stage at INFO
    # sha1: datatrove 0.10.1's default xxhash path passes str to an xxhash that wants bytes.
    config = minhash.MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(64, "sha1"))
    base = os.path.join(workdir, f"datatrove_{language}")
    kept = set()

    def documents():
        return [Document(text=t, id=str(i)) for i, t in enumerate(texts)]

    def collect(data, rank=0, world_size=1):
        for document in data:
            kept.add(int(document.id))
            yield document

    def execute(stage, pipeline, tasks=1):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{base}/logs/{stage}").run()

    execute(1, [documents(), minhash.MinhashDedupSignature(output_folder=f"{base}/sigs", config=config,
                                                           language=language)])
    execute(2, [minhash.MinhashDedupBuckets(input_folder=f"{base}/sigs", output_folder=f"{base}/buckets",
                                            config=config)], tasks=config.num_buckets)
    execute(3, [minhash.MinhashDedupCluster(input_folder=f"{base}/buckets", output_folder=f"{base}/remove",
                                            config=config)])
    execute(4, [documents(), minhash.MinhashDedupFilter(input_folder=f"{base}/remove"), collect])
    return np.array([i not in kept for i in range(len(texts))])


def score(flagged: np.ndarray, planted: set) -> dict:
    copies = np.array(sorted(planted))
    hits = int(flagged[copies].sum())
    return {"flagged": int(flagged.sum()), "recall": round(hits / len(copies), 3),
            "precision": round(hits / max(int(flagged.sum()), 1), 3)}


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_language(name: str, texts: list, planted: set, args, spark, workdir: str) -> dict:
    data = os.path.join(workdir, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    runs = {"megalm local": lambda: run_megalm_local(data, len(texts), workdir, args.threshold, args.workers)}
    if spark is not None:
        runs["megalm spark"] = lambda: run_megalm_spark(spark, data, len(texts), workdir, args.threshold)
    runs["datasketch"] = lambda: run_datasketch(texts, args.threshold)
    if args.datatrove:
        runs["datatrove"] = lambda: run_datatrove(texts, "eng" if name == "english" else "zho", workdir)
    results = {}
    for contestant, fn in runs.items():
        flagged, seconds = timed(fn)
        results[contestant] = {"seconds": round(seconds, 2), "docs_per_s": round(len(texts) / seconds),
                               **score(flagged, planted)}
        print(f"\n  {name:8s} {contestant:13s} {seconds:7.2f} s {len(texts) / seconds:9,.0f} docs/s  "
              f"recall {results[contestant]['recall']:.3f}  precision {results[contestant]['precision']:.3f}",
              flush=True)
    local = results["megalm local"]["seconds"]
    for result in results.values():
        result["time_vs_megalm_local"] = round(result["seconds"] / local, 2)
    return {"documents": len(texts), "planted": len(planted), "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=3.0, help="English: MB of stdlib sources.")
    parser.add_argument("--chinese-docs", type=int, default=3000, help="Chinese: synthetic documents.")
    parser.add_argument("--copies", type=float, default=0.2, help="Fraction of documents given an edited copy.")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--workers", type=int, default=2, help="megalm local worker processes.")
    parser.add_argument("--spark-master", default="local[2]", help="'' skips Spark.")
    args = parser.parse_args()
    try:
        import datatrove  # noqa: F401
        import spacy  # noqa: F401  (datatrove's word tokenizers)
        args.datatrove = True
    except ImportError:
        args.datatrove = False
        print("datatrove (with spaCy) is not installed: skipped", flush=True)
    rng = random.Random(0)
    corpora = {"english": plant(english_documents(args.max_mb, rng), edit_english, args.copies, rng),
               "chinese": plant(chinese_documents(args.chinese_docs, rng), edit_chinese, args.copies, rng)}
    spark, startup = None, None
    if args.spark_master:
        from megalm.data.spark_engine import spark_session

        spark, startup = timed(spark_session, args.spark_master, "megalm dedup bench")
        spark.sparkContext.setLogLevel("ERROR")
        print(f"Spark {spark.version} on {args.spark_master}: started in {startup:.1f} s (not counted below)")
    report = {"spark_startup_seconds": round(startup, 1) if startup else None}
    with tempfile.TemporaryDirectory() as workdir:
        for name, (texts, planted) in corpora.items():
            print(f"{name}: {len(texts)} documents ({len(planted)} planted near copies)", flush=True)
            report[name] = bench_language(name, texts, planted, args, spark, workdir)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
