"""Chinese and mixed-script text in the cleaning pipeline: near duplicates found by character
shingles, words for the quality rules, the language filter."""

import json
import random
import sys

import numpy as np
import pytest

from megalm.data import langid
from megalm.data import text as text_module
from megalm.data.clean import CleanConfig, clean_corpus
from megalm.data.errors import DataError
from megalm.data.minhash import MinHasher
from megalm.data.quality import QualityConfig, check_quality
from megalm.data.text import split_words

# Common characters of modern Chinese: synthetic "literary" text is drawn from them.
HAN = ("的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么"
       "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分"
       "将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重"
       "被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住"
       "员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制"
       "解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非")
PUNCTUATION = "，。；、！？"
VOCABULARY = ("river mill village summer children swim pools weir autumn farmers apples cider families "
              "streets train city fair parade dancing century order events quiet short ride bridge market "
              "church school garden field forest hill valley road house window door table chair lamp "
              "the of and to that with have be").split()


def chinese_text(rng, n):
    """n characters of Han text with a punctuation mark every 5 to 12 characters."""
    out = []
    while len(out) < n:
        out.extend(rng.choice(HAN) for _ in range(rng.randint(5, 12)))
        out.append(rng.choice(PUNCTUATION))
    return "".join(out[:n - 1]) + "。"


def edit_characters(text, rng, fraction):
    """Substitute, delete or insert `fraction` of the Han characters (at least one)."""
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c in HAN]
    for i in sorted(rng.sample(positions, max(1, round(fraction * len(positions)))), reverse=True):
        op = rng.random()
        if op < 0.5:
            chars[i] = rng.choice(HAN)
        elif op < 0.75:
            del chars[i]
        else:
            chars.insert(i, rng.choice(HAN))
    return "".join(chars)


def english_text(rng, n):
    return " ".join(rng.choice(VOCABULARY) for _ in range(n))


def edit_words(text, rng, fraction):
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(VOCABULARY)
    return " ".join(words)


def run_clean(tmp_path, documents, **config):
    path = tmp_path / "in.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(documents):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "out.jsonl"
    counts = clean_corpus([str(path)], str(out), CleanConfig(**config), rejected=str(tmp_path / "rejected.jsonl"))
    kept = [json.loads(line)["id"] for line in open(out, encoding="utf-8")]
    rejected = {r["id"]: r["rejected_by"] for r in map(json.loads, open(tmp_path / "rejected.jsonl", encoding="utf-8"))}
    return kept, rejected, counts


def planted(make, edit, rng, originals=60, fraction=0.02):
    """`originals` distinct documents, then an edited copy of each: ids >= originals are copies."""
    docs = [make(rng) for _ in range(originals)]
    return docs + [edit(doc, rng, fraction) for doc in docs]


@pytest.mark.parametrize("language", ["zh", "en"])
def test_planted_near_duplicates_found_and_distinct_documents_kept(tmp_path, language):
    rng = random.Random(3)
    if language == "zh":  # short texts, the hard case: 60 to 150 characters, 2% of them edited
        docs = planted(lambda r: chinese_text(r, r.randint(60, 150)), edit_characters, rng)
    else:
        docs = planted(lambda r: english_text(r, r.randint(80, 200)), edit_words, rng)
    kept, rejected, counts = run_clean(tmp_path, docs)
    originals = len(docs) // 2
    assert kept[:originals] == list(range(originals)), "a distinct document was lost"
    found = sum(rejected.get(i) == "near_duplicate" for i in range(originals, len(docs)))
    assert found >= 0.9 * originals, f"{found} of {originals} planted near duplicates found"
    assert counts["removed"]["near_duplicate"] == found


def test_character_shingles_beat_five_grams_on_short_chinese():
    """One edit spoils n shingles: on 40-character texts character 5-grams push Jaccard near the
    threshold, 3-grams keep it well above."""
    rng = random.Random(5)
    pairs = [(a, edit_characters(a, rng, 0.05)) for a in (chinese_text(rng, 40) for _ in range(40))]

    def agreement(size):
        hasher = MinHasher(cjk_shingle_size=size, num_perm=256)
        return np.mean([np.mean(hasher.signature(a) == hasher.signature(b)) for a, b in pairs])

    assert agreement(3) > agreement(5) + 0.05


def test_mixed_documents_shingle_each_script_its_own_way():
    assert split_words("我们用 Python 写程序，ok") == ["我", "们", "用", "Python", "写", "程", "序", "，ok"]
    hasher = MinHasher(shingle_size=5, cjk_shingle_size=3, simplify=False)
    # 4 Han characters give 2 character 3-grams; 5 English words give one word 5-gram; together
    # each English word starts a 5-gram (running on into the Han text) and each of the first two
    # Han characters a 3-gram.
    assert len(hasher.shingles("春天来了")) == 2
    assert len(hasher.shingles("one two three four five")) == 1
    assert len(hasher.shingles("one two three four five 春天来了")) == 5 + 2
    # Text too short for a shingle of its script's size is one shingle.
    assert len(hasher.shingles("春天")) == 1


def test_mixed_document_near_duplicates(tmp_path):
    rng = random.Random(7)

    def mixed(r):
        return "".join(chinese_text(r, r.randint(15, 30)) + " " + english_text(r, r.randint(3, 8)) + " "
                       for _ in range(6))

    def edit_both(doc, r, fraction):
        return edit_words(edit_characters(doc, r, fraction), r, fraction)

    docs = planted(mixed, edit_both, rng, originals=30)
    kept, rejected, _ = run_clean(tmp_path, docs, quality=False)
    assert kept[:30] == list(range(30))
    assert sum(rejected.get(i) == "near_duplicate" for i in range(30, 60)) >= 27
    # The English words count: replacing all of them makes a different document.
    hasher = MinHasher()
    base = docs[0]
    swapped = " ".join(w if any(text_module.is_cjk_word(c) for c in w) else "zebra" for w in base.split(" "))
    assert np.mean(hasher.signature(base) == hasher.signature(swapped)) < 0.7


def test_quality_rules_count_chinese_words_and_repetition():
    rng = random.Random(11)
    good = chinese_text(rng, 300)
    assert check_quality(good, QualityConfig()) is None
    assert check_quality(chinese_text(rng, 30), QualityConfig()) == "too_few_words"
    phrase = chinese_text(rng, 12)
    repeated = chinese_text(rng, 150) + phrase * 8
    assert check_quality(repeated, QualityConfig()).startswith(("duplicate_", "top_"))
    mixed = chinese_text(rng, 200) + " the model with attention and the data " + chinese_text(rng, 100)
    assert check_quality(mixed, QualityConfig()) is None


def test_language_filter_on_chinese_and_mixed(tmp_path, monkeypatch):
    monkeypatch.setattr(langid, "_bundled_model", lambda: None)  # the script count, whatever is installed
    rng = random.Random(13)
    docs = [chinese_text(rng, 200), english_text(rng, 120), chinese_text(rng, 150) + " with a few English words"]
    kept, rejected, _ = run_clean(tmp_path, docs, language=["zh"], language_model=None, quality=False)
    assert kept == [0, 2]
    assert rejected == {1: "language"}


def test_jieba_segmenter(tmp_path):
    pytest.importorskip("jieba", reason="jieba is optional (pip install jieba)")
    words = split_words("我们用 Python 写程序", "jieba")
    assert "Python" in words and "我们" in words
    rng = random.Random(17)
    docs = planted(lambda r: chinese_text(r, r.randint(80, 150)), edit_characters, rng, originals=20)
    kept, rejected, _ = run_clean(tmp_path, docs, cjk_segmenter="jieba", quality=False,
                                 minhash_cjk_shingle_size=2)  # a jieba word is ~1.5 characters
    assert kept[:20] == list(range(20))
    assert sum(rejected.get(i) == "near_duplicate" for i in range(20, 40)) >= 18


def test_jieba_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    text_module.jieba_cut.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install jieba"):
            run_clean(tmp_path, ["文本"], cjk_segmenter="jieba")
    finally:
        text_module.jieba_cut.cache_clear()
    assert not (tmp_path / "out.jsonl").exists()
