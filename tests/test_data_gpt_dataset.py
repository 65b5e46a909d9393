"""GPT datasets: Megatron sample semantics, caching, splits, blending and resumption."""

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from megalm.data import DataError, _native, build_train_valid_test_datasets
from megalm.data.blended_dataset import BlendedDataset
from megalm.data.builder import parse_data_path, parse_split, split_ranges
from megalm.data.gpt_dataset import GPTDataset
from megalm.data.helpers import build_blending_indices, build_sample_index
from megalm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megalm.data.sampler import PretrainingSampler

needs_native = pytest.mark.skipif(_native.load("dataset") is None, reason="no C++ compiler / pybind11")


def make_dataset(prefix, num_docs=100, seed=0, first_token=0, max_len=120):
    """Documents whose tokens are consecutive integers, so every token is unique and traceable."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, size=num_docs)
    lengths[::17] = 0  # some empty documents
    token = first_token
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for n in lengths:
            builder.add_document(np.arange(token, token + n))
            token += n
        builder.finalize()
    return str(prefix)


def config(data_path, split="969,30,1", cache=None):
    return SimpleNamespace(data_path=data_path, split=split, data_cache_path=cache)


def test_one_epoch_covers_every_token_once(tmp_path):
    prefix = make_dataset(tmp_path / "ds")
    indexed = IndexedDataset(prefix)
    seq = 16
    total = indexed.num_tokens
    ds = GPTDataset(indexed, np.arange(len(indexed)), seq, (total - 1) // seq, seed=3)
    assert ds.num_epochs == 1 and len(ds) == (total - 1) // seq
    seen = np.concatenate([ds[i]["tokens"][:-1] for i in range(len(ds))])
    # Samples overlap by one token, so the inputs of all samples tile the stream exactly once.
    assert len(seen) == len(np.unique(seen)) == len(ds) * seq
    assert set(seen.tolist()) <= set(range(total))
    assert total - len(seen) <= seq
    sample = ds[0]["tokens"]
    assert sample.dtype == np.int64 and sample.shape == (seq + 1,)


def test_documents_are_shuffled_per_epoch(tmp_path):
    indexed = IndexedDataset(make_dataset(tmp_path / "ds", num_docs=50))
    docs = np.arange(10, 40)
    ds = GPTDataset(indexed, docs, 8, 1000, seed=1)
    per_epoch = ds.document_index.reshape(ds.num_epochs, len(docs))
    for epoch in per_epoch:
        assert sorted(epoch.tolist()) == docs.tolist()
    assert not all((per_epoch[0] == e).all() for e in per_epoch[1:])


def test_samples_cross_document_boundaries_in_stream_order(tmp_path):
    indexed = IndexedDataset(make_dataset(tmp_path / "ds", num_docs=30))
    ds = GPTDataset(indexed, np.arange(30), 32, 50, seed=0)
    stream = np.concatenate([indexed[d] for d in ds.document_index])
    for i in range(len(ds)):
        j = ds.shuffle_index[i]
        np.testing.assert_array_equal(ds[i]["tokens"], stream[j * 32: j * 32 + 33])


def test_enough_epochs_for_the_requested_samples(tmp_path):
    indexed = IndexedDataset(make_dataset(tmp_path / "ds", num_docs=20))
    ds = GPTDataset(indexed, np.arange(20), 64, 500, seed=0)
    assert len(ds) >= 500 and ds.num_epochs > 1


def test_deterministic_and_resumable(tmp_path):
    prefix = make_dataset(tmp_path / "ds")
    cfg = config([prefix], "90,10,0")
    train, valid, test = build_train_valid_test_datasets(cfg, 16, (300, 20, 0), seed=7)
    assert test is None
    stream = [train[i]["tokens"] for i in range(len(train))]
    again, _, _ = build_train_valid_test_datasets(config([prefix], "90,10,0", str(tmp_path / "other")),
                                                  16, (300, 20, 0), seed=7)
    k = 123
    resumed = [again[i]["tokens"] for i in range(k, len(again))]
    assert all((a == b).all() for a, b in zip(stream[k:], resumed))
    other_seed, _, _ = build_train_valid_test_datasets(cfg, 16, (300, 20, 0), seed=8)
    assert not all((train[i]["tokens"] == other_seed[i]["tokens"]).all() for i in range(10))


def test_sampler_resumes_the_same_batches():
    full = [b for b in PretrainingSampler(100, 0, 4, data_parallel_rank=1, data_parallel_size=2)]
    resumed = list(PretrainingSampler(100, 40, 4, data_parallel_rank=1, data_parallel_size=2))
    assert full[5:] == resumed and full[0] == [4, 5, 6, 7]
    ranks = [list(PretrainingSampler(96, 0, 3, r, 4)) for r in range(4)]
    flat = sorted(i for rank in ranks for batch in rank for i in batch)
    assert flat == list(range(96))


def test_index_cache_is_reused_and_rebuilt_when_stale(tmp_path):
    prefix = make_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and any(f.endswith("description.json") for f in files)
    second = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    assert isinstance(second.shuffle_index, np.memmap)
    np.testing.assert_array_equal(first.shuffle_index, second.shuffle_index)
    time.sleep(0.01)
    make_dataset(tmp_path / "ds", seed=1)  # new data under the same name
    third = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    assert not isinstance(third.shuffle_index, np.memmap)
    assert sorted(os.listdir(cache)) == files



def _truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())


def _wrong_length(path):
    np.save(path, np.load(path)[:-1])


def _wrong_dtype(path):
    np.save(path, np.load(path).astype(np.int16))


def _out_of_range(path):
    array = np.load(path)
    array[-1] = -5 if array.ndim == 1 else (0, 10_000)
    np.save(path, array)


@pytest.mark.parametrize("part", ["document", "sample", "shuffle"])
@pytest.mark.parametrize("damage, problem", [(_truncate, "unreadable"), (_garbage, "unreadable"),
                                             (_wrong_length, "shape"), (_wrong_dtype, "dtype int16"),
                                             (_out_of_range, "values"), (lambda p: p.write_bytes(b""), "unreadable")])
def test_damaged_cached_index_is_rebuilt_with_a_warning(tmp_path, caplog, part, damage, problem):
    prefix = make_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    (damaged,) = cache.glob(f"*-{part}_index.npy")
    damage(damaged)
    with caplog.at_level("WARNING", logger="megalm.data.gpt_dataset"):
        second = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    (record,) = caplog.records
    assert record.getMessage().startswith(f"cached dataset index {damaged} is invalid ({problem}")
    assert record.getMessage().endswith("): rebuilding the indices") and "\n" not in record.getMessage()
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    assert len(list(cache.iterdir())) == 4 and not list(cache.glob("*.tmp*"))
    caplog.clear()
    third = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    assert isinstance(third.shuffle_index, np.memmap) and not caplog.records  # the rebuilt cache is used
    np.testing.assert_array_equal(third[5]["tokens"], first[5]["tokens"])


def test_damaged_cache_description_is_rebuilt_with_a_warning(tmp_path, caplog):
    prefix = make_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    (description,) = cache.glob("*-description.json")
    description.write_text('{"class": "GPTDat')
    with caplog.at_level("WARNING", logger="megalm.data.gpt_dataset"):
        second = GPTDataset(IndexedDataset(prefix), np.arange(100), 16, 100, 0, cache_path=str(cache))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"cached dataset description {description} "
                                                                       f"is unreadable"]
    np.testing.assert_array_equal(second.shuffle_index, first.shuffle_index)
    assert json.loads(description.read_text())["class"] == "GPTDataset"

def test_default_cache_lives_next_to_the_data(tmp_path):
    prefix = make_dataset(tmp_path / "ds")
    build_train_valid_test_datasets(config([prefix], "80,10,10"), 16, (50, 5, 1), seed=0)
    assert len(os.listdir(tmp_path / "cache")) == 12


@needs_native
def test_cpp_and_numpy_index_builders_identical():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 60, size=500).astype(np.int32)
    sizes[::7] = 0
    document_index = np.concatenate([rng.permutation(500) for _ in range(3)]).astype(np.int32)
    for seq in (1, 7, 128):
        n = (int(sizes[document_index].sum()) - 1) // seq
        native = build_sample_index(sizes, document_index, seq, n, use_native=True)
        numpy = build_sample_index(sizes, document_index, seq, n, use_native=False)
        np.testing.assert_array_equal(native, numpy)
    for weights in ([0.5, 0.5], [0.3, 0.2, 0.5], [1 / 3] * 3, [0.01, 0.99]):
        native = build_blending_indices(np.array(weights), 20_000, use_native=True)
        python = build_blending_indices(np.array(weights), 20_000, use_native=False)
        np.testing.assert_array_equal(native[0], python[0])
        np.testing.assert_array_equal(native[1], python[1])


def test_blend_keeps_the_weights(tmp_path):
    a = make_dataset(tmp_path / "a", seed=1)
    b = make_dataset(tmp_path / "b", seed=2, first_token=10**6)
    train, valid, _ = build_train_valid_test_datasets(config(["0.3", a, "0.7", b], "95,5,0"), 8, (2000, 100, 0), 0)
    assert isinstance(train, BlendedDataset) and len(train) == 2000 and len(valid) == 100
    from_b = np.array([train[i]["tokens"][0] >= 10**6 for i in range(len(train))])
    assert abs(from_b.mean() - 0.7) < 0.01
    for n in (10, 100, 999):  # every prefix of the blend holds the proportions too
        assert abs(from_b[:n].sum() - 0.7 * n) <= 1


def test_unweighted_paths_blend_equally(tmp_path):
    a, b = make_dataset(tmp_path / "a", seed=1), make_dataset(tmp_path / "b", seed=2)
    assert parse_data_path([a, b]) == ([a, b], [0.5, 0.5])
    assert parse_data_path(["2", a, "6", b]) == ([a, b], [0.25, 0.75])


@pytest.mark.parametrize("data_path, message", [
    (["/no/such/prefix"], r"--data-path /no/such/prefix: /no/such/prefix.idx does not exist"),
    (["0.5", "/no/a", "x", "/no/b"], r"'x' should be a weight"),
    (["0.5", "/no/a", "0.5"], "odd number"),
    ([], "--data-path is empty"),
])
def test_bad_data_path_is_a_clear_error(data_path, message):
    with pytest.raises(DataError, match=message):
        parse_data_path(data_path)


def test_prefix_with_extension_gets_a_hint(tmp_path):
    prefix = make_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="without .bin/.idx"):
        parse_data_path([prefix + ".bin"])


def test_split_rules():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("8/2") == pytest.approx([0.8, 0.2, 0.0])
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 3), (3, 6), (6, 10)] or \
        split_ranges(parse_split("1,1,1"), 10)[-1][1] == 10
    for bad in ("a,b", "0,0,0", "1,-1,0", "1,2,3,4"):
        with pytest.raises(DataError, match="--split"):
            parse_split(bad)


def test_too_little_data_for_a_split(tmp_path, caplog):
    prefix = make_dataset(tmp_path / "ds", num_docs=10)
    train, valid, test = build_train_valid_test_datasets(config([prefix], "98,1,1"), 8, (10, 1, 1), 0)
    assert len(train) >= 10 and valid is None and test is None
    assert "too few to give the test split" in caplog.text
    with pytest.raises(DataError, match="too few to give the train split"):
        build_train_valid_test_datasets(config([prefix], "1,100,100"), 8, (10, 1, 1), 0)
    with pytest.raises(DataError, match="not enough for one sample"):
        build_train_valid_test_datasets(config([prefix], "1,0,0"), 100_000, (1, 0, 0), 0)


def test_check_tokenizer_fits(tmp_path):
    from megalm.data import check_tokenizer_fits
    from megalm.data.tokenizer.null import NullTokenizer
    prefix = make_dataset(tmp_path / "ds", num_docs=5, max_len=10)
    top = IndexedDataset(prefix).max_token()
    assert check_tokenizer_fits(NullTokenizer(top + 2), [prefix]) == top
    with pytest.raises(DataError, match=f"holds token id {top} but the tokenizer"):
        check_tokenizer_fits(NullTokenizer(top), [prefix])
    with pytest.raises(DataError, match="the model's vocabulary is 4"):
        check_tokenizer_fits(NullTokenizer(top + 2), [prefix], padded_vocab_size=4)
