"""The `.bin/.idx` format: round trips, Megatron's byte layout, clear errors on damaged files."""

import struct

import numpy as np
import pytest

from megalm.data import DataError
from megalm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, merge_datasets, token_dtype, write_index


def write(prefix, documents, dtype):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in documents:
            builder.add_document(doc)
        builder.finalize()


def random_documents(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, 300)) for _ in range(n)]


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65_000), (np.int32, 200_000)])
def test_write_then_read_back_equal(tmp_path, dtype, vocab):
    documents = random_documents(200, vocab)
    write(tmp_path / "ds", documents, dtype)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds.dtype == np.dtype(dtype) and len(ds) == 200 and ds.num_documents == 200
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(ds[i], doc)
    assert ds.num_tokens == sum(len(d) for d in documents)
    np.testing.assert_array_equal(ds.get(3, 2, 5), documents[3][2:7])


def test_token_dtype_follows_megatron():
    assert token_dtype(65_499) == np.uint16 and token_dtype(65_500) == np.int32


def test_index_layout_is_megatron_mmidx(tmp_path):
    write(tmp_path / "ds", [[1, 2, 3], [4], [5, 6]], np.uint16)
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, sequences, documents) == (1, 8, 3, 4)
    lengths = np.frombuffer(raw, np.int32, 3, 34)
    pointers = np.frombuffer(raw, np.int64, 3, 34 + 12)
    doc_index = np.frombuffer(raw, np.int64, 4, 34 + 36)
    assert lengths.tolist() == [3, 1, 2] and pointers.tolist() == [0, 6, 8] and doc_index.tolist() == [0, 1, 2, 3]
    assert np.fromfile(tmp_path / "ds.bin", np.uint16).tolist() == [1, 2, 3, 4, 5, 6]


def test_multi_sequence_documents(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "ds"), np.int32) as builder:
        builder.add_item([1, 2])
        builder.add_item([3])
        builder.end_document()
        builder.add_item([4])
        builder.finalize()
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == 3 and ds.document_indices.tolist() == [0, 2, 3]


def test_truncated_index_names_the_file(tmp_path):
    write(tmp_path / "ds", random_documents(10, 100), np.uint16)
    idx = tmp_path / "ds.idx"
    idx.write_bytes(idx.read_bytes()[:-5])
    with pytest.raises(DataError, match=rf"{idx} is \d+ bytes but its header promises .*truncated"):
        IndexedDataset(str(tmp_path / "ds"))
    idx.write_bytes(b"MMIDIDX")
    with pytest.raises(DataError, match=f"{idx} is not a Megatron indexed dataset index"):
        IndexedDataset(str(tmp_path / "ds"))


def test_foreign_or_wrong_version_index(tmp_path):
    write(tmp_path / "ds", random_documents(3, 100), np.uint16)
    idx = tmp_path / "ds.idx"
    good = idx.read_bytes()
    idx.write_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(DataError, match="wrong magic"):
        IndexedDataset(str(tmp_path / "ds"))
    idx.write_bytes(good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(DataError, match="index version 2"):
        IndexedDataset(str(tmp_path / "ds"))
    idx.write_bytes(good[:17] + bytes([42]) + good[18:])
    with pytest.raises(DataError, match="unknown token dtype code 42"):
        IndexedDataset(str(tmp_path / "ds"))


def test_truncated_bin(tmp_path):
    write(tmp_path / "ds", [[1] * 100], np.uint16)
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"ds\.bin is 10 bytes but .*ds\.idx needs exactly 200 .*truncated"):
        IndexedDataset(str(tmp_path / "ds"))


def test_bin_longer_than_its_index_needs(tmp_path):
    write(tmp_path / "ds", [[1, 2, 3], [4, 5]], np.uint16)
    bin_file = tmp_path / "ds.bin"
    bin_file.write_bytes(bin_file.read_bytes() + b"\x07\x00" * 3)
    with pytest.raises(DataError) as error:
        IndexedDataset(str(tmp_path / "ds"))
    assert str(error.value) == (
        f"{bin_file} is 16 bytes but {tmp_path / 'ds.idx'} needs exactly 10 (2 sequences, 5 uint16 tokens): the .bin "
        f"has 6 bytes the .idx does not describe; re-run tools/preprocess_data.py to rebuild both files, or pair "
        f"this .idx with the .bin it was written with")
    assert bin_file.read_bytes()[:10] == np.array([1, 2, 3, 4, 5], np.uint16).tobytes()  # nothing rewritten


@pytest.mark.parametrize("index_dtype, bin_dtype, fits", [(np.uint16, np.int32, "int32"),
                                                           (np.int32, np.uint16, "int16 / uint16")])
def test_index_dtype_that_does_not_match_the_bin(tmp_path, index_dtype, bin_dtype, fits):
    """A .idx from a run with another vocabulary size next to this .bin: tokens would be garbage."""
    documents = [[1, 2, 3], [4, 5, 6, 7]]
    write(tmp_path / "idx_from", documents, index_dtype)
    write(tmp_path / "bin_from", documents, bin_dtype)
    (tmp_path / "idx_from.bin").write_bytes((tmp_path / "bin_from.bin").read_bytes())
    with pytest.raises(DataError, match=rf"idx_from\.bin is \d+ bytes but .*idx_from\.idx needs exactly \d+ .*fits 7 "
                                        rf"tokens of {fits}, so the \.idx's token dtype \({np.dtype(index_dtype).name}\)"
                                        rf" does not match the \.bin"):
        IndexedDataset(str(tmp_path / "idx_from"))


def test_index_whose_pointers_do_not_start_at_zero(tmp_path):
    write(tmp_path / "ds", [[1, 2], [3]], np.uint16)
    idx = tmp_path / "ds.idx"
    raw = bytearray(idx.read_bytes())
    raw[34 + 8:34 + 16] = struct.pack("<q", 2)  # first pointer (after two int32 lengths)
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"ds\.idx: its first sequence starts at byte 2 of .*ds\.bin, not 0"):
        IndexedDataset(str(tmp_path / "ds"))


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx: no such file"):
        IndexedDataset(str(tmp_path / "nope"))


def test_failed_build_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_tokens_that_do_not_fit_the_dtype(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as builder:
        with pytest.raises(ValueError, match="do not fit uint16"):
            builder.add_document(np.array([70_000]))
        builder.discard()


def test_merge(tmp_path):
    a, b = random_documents(5, 1000, 1), random_documents(7, 1000, 2)
    write(tmp_path / "a", a, np.uint16)
    write(tmp_path / "b", b, np.uint16)
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"))
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert len(ds) == 12 and ds.document_indices.tolist() == list(range(13))
    for i, doc in enumerate(a + b):
        np.testing.assert_array_equal(ds[i], doc)
    write(tmp_path / "c", a, np.int32)
    with pytest.raises(DataError, match="holds int32 tokens but the merged dataset is uint16"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "ac"))
    assert not (tmp_path / "ac.bin").exists() and not (tmp_path / "ac.idx").exists()


def test_empty_dataset(tmp_path):
    write_index(str(tmp_path / "e.idx"), np.uint16, np.zeros(0, np.int32), np.zeros(1, np.int64))
    (tmp_path / "e.bin").write_bytes(b"")
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_documents == 0 and ds.max_token() == -1


def test_pickles_as_its_prefix(tmp_path):
    import pickle
    write(tmp_path / "ds", random_documents(20, 100), np.uint16)
    ds = IndexedDataset(str(tmp_path / "ds"))
    data = pickle.dumps(ds)
    assert len(data) < 500
    np.testing.assert_array_equal(pickle.loads(data)[7], ds[7])
