"""Gopher quality and repetition rules, one hand-made document per rule, English and Chinese."""

import json
from pathlib import Path

import pytest

from megalm.data.quality import RULES, QualityConfig, check_quality

DATA = Path(__file__).parent / "data"
DEFAULTS = QualityConfig()

GOOD_EN = (
    "The river that runs past the old mill has been the centre of village life for as long as anyone "
    "can remember. In summer, children swim in the shallow pools below the weir, and in autumn the "
    "farmers bring their apples to be pressed into cider.\n\n"
    "Most of the families who live here today arrived within the last fifty years, drawn by the quiet "
    "streets and the short train ride into the city. Even so, the annual fair still follows the same "
    "order of events that it did a century ago, with the parade first and the dancing last."
)


def chinese_documents():
    return [json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl", encoding="utf-8")]


def test_good_documents_pass():
    assert check_quality(GOOD_EN, DEFAULTS) is None
    for text in chinese_documents():
        assert check_quality(text, DEFAULTS, language="zh") is None
        assert check_quality(text, DEFAULTS) is None  # no language known: CJK skips the stop-word rule


def english_words(n):
    base = GOOD_EN.split()
    return " ".join(base[i % len(base)] for i in range(n))


@pytest.mark.parametrize("text, rule", [
    ("The cat and the dog sat with me.", "too_few_words"),
    (" ".join(["a", "to", "of", "the", "an", "be"] * 20), "mean_word_length"),
    (" ".join(f"counterrevolutionaries{i} internationalizations{i} the and" for i in range(20)),
     "mean_word_length"),
    (english_words(80) + " #tag" * 12, "symbol_word_ratio"),
    (english_words(80) + " ..." * 12, "symbol_word_ratio"),
    ("\n".join(f"- {english_words(12)} {i}" for i in range(10)), "bullet_lines"),
    ("\n".join(f"{english_words(9)} item {i}..." for i in range(10)), "ellipsis_lines"),
    (english_words(60) + " " + " ".join(["1234", "5678", "--", "99.9"] * 10), "alpha_words"),
    (" ".join(["river", "pools", "weir", "apples", "cider", "streets", "train", "city", "fair", "parade"] * 8),
     "stop_words"),
])
def test_english_quality_rules(text, rule):
    assert check_quality(text, DEFAULTS) == rule


def made_up_words(n, offset=0):
    """n distinct pronounceable words of six letters."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so"]
    return [syllables[i // 64 % 8] + syllables[i // 8 % 8] + syllables[i % 8] for i in range(offset, offset + n)]


def unique_sentence(i):
    return f"Sentence {i} tells how the {['red', 'blue', 'green', 'gold'][i % 4]} boat number {i * 13} left the harbour."


@pytest.mark.parametrize("text, rule", [
    ("\n".join([unique_sentence(i) for i in range(10)] + ["The same line repeats with the tide."] * 6),
     "duplicate_lines"),
    ("\n".join([unique_sentence(i) for i in range(20)]
               + ["A much longer line that repeats, and repeats, and the repetition dominates all the "
                  "characters of the document because it is very long indeed."] * 4), "duplicate_lines_chars"),
    ("\n\n".join(["\n".join(unique_sentence(10 * p + i) for i in range(6)) for p in range(4)]
                   + ["This paragraph is repeated."] * 4), "duplicate_paragraphs"),
    (" ".join(unique_sentence(i) for i in range(12)) + " " + "the harbour of the harbour " * 30, "top_2gram_chars"),
    (" ".join(made_up_words(250) + ["the", "and"] + made_up_words(30, 300) * 3), "duplicate_5gram_chars"),
])
def test_english_repetition_rules(text, rule):
    assert check_quality(text, DEFAULTS) == rule


def test_chinese_counts_characters_as_words():
    assert check_quality("今天天气很好，我们去公园散步。", DEFAULTS, language="zh") == "too_few_words"
    # Eighty characters of Chinese pass the word count (and have no spaces at all).
    text = chinese_documents()[0][:80]
    assert " " not in text
    assert check_quality(text, QualityConfig(min_words=50), language="zh") is None


def test_chinese_repetition_rules():
    docs = chinese_documents()
    repeated_lines = "\n".join(docs[1].split("\n\n")[:1] + ["这一行文字在文档里重复出现了很多次。"] * 8)
    assert check_quality(repeated_lines, DEFAULTS, language="zh") == "duplicate_lines"
    repeated_ngrams = docs[2] + "数据清洗非常重要" * 40
    assert check_quality(repeated_ngrams, DEFAULTS, language="zh") in ("top_2gram_chars", "top_3gram_chars",
                                                                        "top_4gram_chars")
    symbols = docs[3] + "#" * 60
    assert check_quality(symbols, DEFAULTS, language="zh") == "symbol_word_ratio"
    bullets = "\n".join(f"• {line}" for line in docs[4].replace("\n\n", "。").split("。") if line)
    assert check_quality(bullets, QualityConfig(max_bullet_lines_ratio=0.5), language="zh") == "bullet_lines"


def test_thresholds_are_configurable():
    short = english_words(30)
    assert check_quality(short, DEFAULTS) == "too_few_words"
    assert check_quality(short, QualityConfig(min_words=20)) is None
    assert check_quality(english_words(200), QualityConfig(max_words=100)) == "too_many_words"


def test_rule_list_is_complete():
    assert len(RULES) == len(set(RULES)) == 21
