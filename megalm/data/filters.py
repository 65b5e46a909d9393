"""Harmful-content filters: a URL-domain blocklist, per-language bad-word lists, and a user hook.

None ships with lists; the user gives them:

- ``--url-blocklist FILE``: one domain per line (``#`` starts a comment). A document whose
  ``--url-key`` field (default ``url``) has that host, or a subdomain of it, is rejected
  (rule ``url_blocklist``). Documents without the field pass.
- ``--bad-words LANG=FILE [LANG=FILE ...]``: one word or phrase per line. The list of the
  document's language applies: the language filter's answer when it runs, else the dominant
  script (`langid.predict_script`). Words match whole and case-insensitively, except in Chinese
  and Japanese, which have no spaces between words: there a word matches anywhere. More than
  ``--max-bad-words`` matches (default 0) rejects the document (rule ``bad_words``).
- ``--filter-fn module:function``: ``function(record) -> score`` (a number or bool) for each
  document that passed the other rules, the record holding the normalised text; a score below
  ``--filter-threshold`` rejects it (rule ``filter_fn``). The module must be importable where the
  documents are processed (worker processes, Spark executors).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from megalm.data.cli import option
from megalm.data.errors import DataError

# Languages written without spaces between words: bad words match as substrings.
UNSEGMENTED_LANGUAGES = ("zh", "ja")


@dataclass
class FilterConfig:
    url_blocklist: Optional[str] = option(None, "File of blocked domains, one a line: documents whose --url-key "
                                                "host is one of them or a subdomain are removed.")
    url_key: str = option("url", "Record field holding the document's URL, for --url-blocklist.")
    bad_words: list = option([], "Bad-word lists as LANG=FILE (one word or phrase a line), e.g. en=en.txt "
                                 "zh=zh.txt; the document's language picks the list.")
    max_bad_words: int = option(0, "Most bad-word matches a document may hold.")
    filter_fn: Optional[str] = option(None, "module:function called with each record (after the other rules); "
                                            "a score below --filter-threshold removes the document.")
    filter_threshold: float = option(0.5, "Smallest --filter-fn score a document may have.")

    def rules(self) -> list[str]:
        """The rejection reasons these filters can give, in the order they run."""
        return ([name for name, on in (("url_blocklist", self.url_blocklist), ("bad_words", self.bad_words)) if on]
                + (["filter_fn"] if self.filter_fn else []))


def _read_list(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        entries = [line.split("#", 1)[0].strip() for line in f]
    return [e for e in entries if e]


def load_blocklist(path: str) -> frozenset:
    return frozenset(domain.lower().rstrip(".").removeprefix("www.") for domain in _read_list(path, "--url-blocklist"))


def blocked_url(url: str, blocklist: frozenset) -> bool:
    """Whether the URL's host or one of its parent domains is listed."""
    try:
        host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").rstrip(".")
    except ValueError:
        return False
    labels = host.split(".")
    return any(".".join(labels[i:]) in blocklist for i in range(len(labels)))


def load_bad_words(entries: list) -> dict:
    """{language: compiled pattern} from LANG=FILE entries."""
    patterns = {}
    for entry in entries:
        language, sep, path = entry.partition("=")
        if not sep or not language or not path:
            raise DataError(f"--bad-words {entry}: give LANG=FILE, e.g. --bad-words en=en.txt zh=zh.txt")
        words = sorted(set(_read_list(path, f"--bad-words {language}=")), key=len, reverse=True)
        if not words:
            raise DataError(f"--bad-words {entry}: the file lists no words")
        alternatives = "|".join(map(re.escape, words))
        if language in UNSEGMENTED_LANGUAGES:
            patterns[language] = re.compile(alternatives, re.IGNORECASE)
        else:
            patterns[language] = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    return patterns


def load_filter_fn(spec: str) -> Callable:
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise DataError(f"--filter-fn {spec}: give module:function, e.g. --filter-fn my_filters:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f"--filter-fn {spec}: cannot import {module_name} ({e}); put it on PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DataError(f"--filter-fn {spec}: {module_name} has no function {name}")
    return fn


class ContentFilters:
    """The filters of one FilterConfig, loaded once per worker."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.blocklist = load_blocklist(config.url_blocklist) if config.url_blocklist else None
        self.bad_words = load_bad_words(config.bad_words)
        self.filter_fn = load_filter_fn(config.filter_fn) if config.filter_fn else None

    def check_url(self, record: dict) -> Optional[str]:
        url = record.get(self.config.url_key)
        if self.blocklist is not None and isinstance(url, str) and blocked_url(url, self.blocklist):
            return "url_blocklist"
        return None

    def check_words(self, text: str, language: Optional[str]) -> Optional[str]:
        if not self.bad_words:
            return None
        if language is None:
            from megalm.data.langid import predict_script
            language = predict_script(text)[0]
        pattern = self.bad_words.get(language)
        if pattern is None:
            return None
        matches = 0
        for _ in pattern.finditer(text):
            matches += 1
            if matches > self.config.max_bad_words:
                return "bad_words"
        return None

    def check_score(self, record: dict, where: str) -> Optional[str]:
        if self.filter_fn is None:
            return None
        try:
            score = self.filter_fn(record)
        except Exception as e:
            raise DataError(f"--filter-fn {self.config.filter_fn} failed on {where}: {type(e).__name__}: {e}") from None
        if not isinstance(score, (int, float)):
            raise DataError(f"--filter-fn {self.config.filter_fn} returned {type(score).__name__} for {where}; "
                            f"it must return a number or bool")
        return "filter_fn" if score < self.config.filter_threshold else None
