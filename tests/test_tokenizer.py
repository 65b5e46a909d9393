"""Tokenizers: lossless round trips for every --tokenizer-type, and Hugging Face compatibility."""

import json
import os
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalm.data import DataError, check_vocab
from megalm.data.tokenizer import TOKENIZER_TYPES, build_tokenizer, load_tokenizer
from megalm.data.tokenizer.bpe import GPT2_PATTERN, ByteLevelBPETokenizer, bytes_to_unicode
from megalm.data.tokenizer.bpe_train import train_bpe

DATA = Path(__file__).parent / "data"
ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def small_corpus() -> list[str]:
    """About 300 KB: some standard-library sources, Chinese prose and mixed Unicode."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size > 300_000:
            break
    texts += [json.loads(line)["text"] for line in open(DATA / "zh_sample.jsonl", encoding="utf-8")]
    texts.append("Ünïcödé façade — naïve café; Привет мир; こんにちは世界; 🎉🚀 emoji; tabs\tand  spaces\n")
    return texts


@pytest.fixture(scope="module")
def corpus():
    return small_corpus()


@pytest.fixture(scope="module")
def megabpe(corpus, tmp_path_factory):
    tokenizer = train_bpe(corpus, 1024, special_tokens=["<|endoftext|>", "<|pad|>"])
    path = tmp_path_factory.mktemp("megabpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return tokenizer, path


@pytest.fixture(scope="module")
def gpt2_files(megabpe, tmp_path_factory):
    """GPT-2 style vocab.json + merges.txt written from the MegaBPE vocabulary."""
    tokenizer, _ = megabpe
    table = bytes_to_unicode()
    as_str = {i: "".join(table[b] for b in t) for i, t in tokenizer.tokens.items()}
    directory = tmp_path_factory.mktemp("gpt2")
    vocab = {s: i for i, s in as_str.items()}
    vocab["<|endoftext|>"] = tokenizer.vocab_size
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "\n".join(f"{as_str[a]} {as_str[b]}" for a, b, _ in tokenizer.merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def sentencepiece_model(corpus, tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from megalm.data.tokenizer.sentencepiece import train_sentencepiece
    return train_sentencepiece(corpus, 800, str(tmp_path_factory.mktemp("sp")), ["<|endoftext|>"])


def test_megabpe_vocabulary_layout(megabpe):
    tokenizer, _ = megabpe
    assert tokenizer.vocab_size == 1024
    assert all(tokenizer.tokens[b] == bytes([b]) for b in range(256))
    assert tokenizer.special_tokens == {"<|endoftext|>": 1022, "<|pad|>": 1023}
    assert tokenizer.eod == 1022


@ROUND_TRIP
@given(text=st.text(max_size=300))
def test_megabpe_round_trip(megabpe, text):
    tokenizer, _ = megabpe
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_megabpe_compresses_and_knows_special_tokens(megabpe, corpus):
    tokenizer, _ = megabpe
    text = corpus[0]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2
    assert tokenizer.encode("a<|endoftext|>b")[1] == tokenizer.eod
    assert tokenizer.eod not in tokenizer.encode_ordinary("a<|endoftext|>b")


def test_hf_tokenizers_library_matches_our_ids(megabpe, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer, path = megabpe
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.get_vocab_size(with_added_tokens=True) == tokenizer.vocab_size
    for text in corpus + ["<|endoftext|> between <|pad|> specials"]:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
    assert hf.decode(tokenizer.encode(corpus[-1]), skip_special_tokens=False) == corpus[-1]


def test_saved_tokenizer_json_loads_back_identically(megabpe, corpus):
    tokenizer, path = megabpe
    loaded = ByteLevelBPETokenizer.from_hf_json(str(path))
    assert loaded.merges == tokenizer.merges and loaded.special_tokens == tokenizer.special_tokens
    assert loaded.pattern == tokenizer.pattern
    assert [loaded.encode(t) for t in corpus] == [tokenizer.encode(t) for t in corpus]


def test_gpt2_files_give_the_same_tokens(megabpe, gpt2_files, corpus):
    tokenizer, _ = megabpe
    gpt2 = load_tokenizer("GPT2BPETokenizer", vocab_file=str(gpt2_files / "vocab.json"),
                          merge_file=str(gpt2_files / "merges.txt"))
    assert gpt2.name == "GPT2BPETokenizer" and gpt2.pattern == GPT2_PATTERN
    assert gpt2.eod == tokenizer.vocab_size and gpt2.vocab_size == tokenizer.vocab_size + 1
    assert gpt2.decode(gpt2.encode(corpus[0])) == corpus[0]


@ROUND_TRIP
@given(text=st.text(max_size=300))
def test_gpt2_round_trip(gpt2_files, text):
    gpt2 = load_tokenizer("GPT2BPETokenizer", tokenizer_model=str(gpt2_files))
    assert gpt2.decode(gpt2.encode(text)) == text


@ROUND_TRIP
@given(text=st.text(max_size=300))
def test_huggingface_round_trip(megabpe, text):
    pytest.importorskip("tokenizers")
    _, path = megabpe
    hf = load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path.parent))
    assert hf.decode(hf.encode(text)) == text


@ROUND_TRIP
@given(text=st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=["Cs"]), max_size=300))
def test_sentencepiece_round_trip(sentencepiece_model, text):
    # U+2581 is SentencePiece's own space marker, which its decoder turns into a space.
    sp = load_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model)
    assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_vocabulary(sentencepiece_model):
    sp = load_tokenizer("SentencePieceTokenizer", tokenizer_model=os.path.dirname(sentencepiece_model))
    assert sp.vocab_size == 800 and sp.eod == sp.processor.eos_id()
    assert sp.processor.piece_to_id("<|endoftext|>") > 0


@given(ids=st.lists(st.integers(0, 99), max_size=50))
def test_null_tokenizer_reads_ids(ids):
    null = load_tokenizer("NullTokenizer", vocab_size=100)
    assert null.encode(" ".join(map(str, ids))) == ids
    assert null.encode(null.decode(ids)) == ids
    assert null.vocab_size == 100 and null.eod == 99


def test_build_tokenizer_from_data_config(megabpe):
    from megalm.config import DataConfig
    _, path = megabpe
    tokenizer = build_tokenizer(DataConfig(tokenizer_type="MegaBPE", tokenizer_model=str(path.parent)))
    assert tokenizer.name == "MegaBPE" and tokenizer.vocab_size == 1024


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenizer_type": "Nope"}, "--tokenizer-type 'Nope' is unknown"),
    ({"tokenizer_type": "MegaBPE"}, "needs --tokenizer-model"),
    ({"tokenizer_type": "MegaBPE", "tokenizer_model": "/no/such/dir"}, "--tokenizer-model /no/such/dir: no such file"),
    ({"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/x.model"}, "--tokenizer-model /x.model"),
    ({"tokenizer_type": "GPT2BPETokenizer"}, "needs --vocab-file"),
    ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/v.json", "merge_file": "/m.txt"}, "--vocab-file /v.json"),
    ({"tokenizer_type": "NullTokenizer"}, "needs --vocab-size"),
])
def test_bad_tokenizer_flags_name_the_flag(kwargs, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_tokenizer(**kwargs)


def test_wrong_file_kind_is_a_clear_error(tmp_path, sentencepiece_model):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer file"):
        load_tokenizer("MegaBPE", tokenizer_model=str(tmp_path))
    with pytest.raises(DataError, match="cannot load SentencePiece model"):
        load_tokenizer("SentencePieceTokenizer", tokenizer_model=str(bad))
    wordpiece = tmp_path / "wp.json"
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(DataError, match="HuggingFaceTokenizer"):
        load_tokenizer("MegaBPE", tokenizer_model=str(wordpiece))


def test_check_vocab():
    check_vocab(1000, 1024)
    with pytest.raises(DataError, match="tokenizer has 1030 tokens but the model's vocabulary is 1024"):
        check_vocab(1030, 1024)


def test_all_types_listed():
    assert set(TOKENIZER_TYPES) == {"GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer",
                                    "MegaBPE", "NullTokenizer"}
