"""Token streams on disk: Megatron-LM's memory-mapped `.bin` / `.idx` pair.

`PREFIX.bin` holds the tokens of every sequence back to back. `PREFIX.idx` describes them:

==========================  ==================================================================
``b"MMIDIDX\\x00\\x00"``     magic (9 bytes)
``<Q`` version               1
``<B`` dtype code            1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
                             8 uint16
``<Q`` sequence count        S
``<Q`` document count        D + 1 (entries of the document index)
int32[S]                     sequence lengths, in tokens
int64[S]                     sequence pointers: byte offsets into `.bin`
int64[D + 1]                 document index: the first sequence of each document, then S
==========================  ==================================================================

Megatron-LM reads what we write and the other way round. A document is usually one sequence
(`tools/preprocess_data.py` writes one per document); the document index lets a document span
several.

`IndexedDatasetBuilder` writes under temporary names and renames both files into place in
`finalize`, so an interrupted run never leaves a file under the final name. `IndexedDataset` checks
the index before trusting it, and that the `.bin` has exactly the size the index describes, so a
truncated or foreign file, or a `.idx` paired with another `.bin`, fails with a message naming both.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from typing import Optional, Sequence

import numpy as np

from megalm.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8

# Megatron-LM's rule: uint16 tokens while the vocabulary fits with room to spare.
UINT16_VOCAB_LIMIT = 65_500


def token_dtype(vocab_size: int) -> type:
    """The smallest token type for a vocabulary: uint16 below 65,500 ids, int32 above."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def _tmp(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


class IndexedDatasetBuilder:
    """Append sequences, mark document ends, then `finalize()`; or `discard()` on failure.

    Used as a context manager, an exception discards the temporary files."""

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._bin_tmp = _tmp(bin_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array.array("i")
        self._document_index = array.array("q", [0])
        self._sequences = 0

    def add_item(self, tokens) -> None:
        """Append one sequence."""
        tokens_array = np.asarray(tokens)
        if tokens_array.size and tokens_array.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            if tokens_array.min() < info.min or tokens_array.max() > info.max:
                raise ValueError(f"token ids {tokens_array.min()}..{tokens_array.max()} do not fit "
                                 f"{self.dtype.name}")
        self._bin.write(tokens_array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(tokens_array.size)
        self._sequences += 1

    def end_document(self) -> None:
        self._document_index.append(self._sequences)

    def add_document(self, tokens) -> None:
        """Append one sequence and end the document there."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (same dtype)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{idx_path(prefix)} holds {other.dtype.name} tokens but the merged dataset "
                            f"is {self.dtype.name}: preprocess every part with the same tokenizer")
        offset = self._sequences
        self._lengths.frombytes(other.sequence_lengths.astype(np.int32).tobytes())
        self._sequences += len(other)
        self._document_index.frombytes((other.document_indices[1:] + offset).astype(np.int64).tobytes())
        self._bin.flush()
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 1 << 24)
        other.close()

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        self._bin.close()
        if self._document_index[-1] != self._sequences:
            self.end_document()
        write_index(_tmp(idx_path(self.prefix)), self.dtype, np.frombuffer(self._lengths, np.int32),
                    np.frombuffer(self._document_index, np.int64))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(_tmp(idx_path(self.prefix)), idx_path(self.prefix))

    def discard(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, _tmp(idx_path(self.prefix))):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


def write_index(path: str, dtype, lengths: np.ndarray, document_index: np.ndarray) -> None:
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_index)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(document_index, dtype=np.int64).tobytes(order="C"))


class IndexedDataset:
    """Read-only view of `PREFIX.bin` / `PREFIX.idx`; `ds[i]` is sequence i (a memory-mapped
    numpy array, no copy)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file; --data-path takes the prefix of files written "
                                f"by tools/preprocess_data.py (PREFIX.bin and PREFIX.idx)")
        path = idx_path(prefix)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(_HEADER)
        if len(header) < _HEADER or header[:len(MAGIC)] != MAGIC:
            raise DataError(f"{path} is not a Megatron indexed dataset index (wrong magic or too short): "
                            f"rebuild it with tools/preprocess_data.py")
        version, code, sequences, documents = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise DataError(f"{path}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPES:
            raise DataError(f"{path}: unknown token dtype code {code}")
        expected = _HEADER + sequences * (4 + 8) + documents * 8
        if size != expected:
            raise DataError(f"{path} is {size} bytes but its header promises {expected} "
                            f"({sequences} sequences, {documents} document entries): the file is truncated "
                            f"or damaged; rebuild it with tools/preprocess_data.py")
        self.dtype = np.dtype(DTYPES[code])
        self._index = np.memmap(path, mode="r", dtype=np.uint8)
        offset = _HEADER
        self.sequence_lengths = np.frombuffer(self._index, np.int32, sequences, offset)
        offset += sequences * 4
        self.sequence_pointers = np.frombuffer(self._index, np.int64, sequences, offset)
        offset += sequences * 8
        self.document_indices = np.frombuffer(self._index, np.int64, documents, offset)

        bin_size = os.path.getsize(bin_path(prefix))
        _check_bin_size(prefix, self.dtype, self.sequence_lengths, self.sequence_pointers, bin_size)
        self._bin = np.memmap(bin_path(prefix), mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    # Pickled (e.g. into DataLoader workers started with "spawn") as its prefix: the worker maps
    # the files itself instead of receiving a copy of the data.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence i."""
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        # The .bin holds exactly the tokens the .idx describes (checked when it was opened).
        return len(self._bin) // self.dtype.itemsize

    def max_token(self) -> int:
        """The largest token id (reads the whole `.bin`)."""
        tokens = np.frombuffer(self._bin, self.dtype)
        return int(tokens.max()) if tokens.size else -1

    def close(self) -> None:
        self._index = self._bin = None


def _check_bin_size(prefix: str, dtype: np.dtype, lengths: np.ndarray, pointers: np.ndarray, found: int) -> None:
    """The `.bin` holds exactly the bytes the `.idx` describes, or DataError naming both files.

    Writers (ours and Megatron-LM's) lay the sequences end to end from byte 0: pointer i is the byte
    count of sequences 0..i-1, so the last pointer plus the last length is the sum of all lengths
    times the item size. Checking the two ends is therefore the same test as summing the lengths,
    at O(1) cost instead of reading an index of billions of sequences at every start. A wrong size
    catches a truncated `.bin`, one that belongs to another `.idx`, and a `.idx` whose token dtype
    differs from the `.bin`'s (the size is then off by the ratio of item sizes)."""
    idx, bin_ = idx_path(prefix), bin_path(prefix)
    if len(lengths) and int(pointers[0]) != 0:
        raise DataError(f"{idx}: its first sequence starts at byte {int(pointers[0])} of {bin_}, not 0: the index is "
                        f"damaged or not written by a Megatron-style writer; rebuild both with "
                        f"tools/preprocess_data.py")
    expected = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if len(lengths) else 0
    if found == expected:
        return
    tokens = expected // dtype.itemsize
    fits = sorted(np.dtype(t).name for t in DTYPES.values()
                  if np.issubdtype(t, np.integer) and tokens and found == tokens * np.dtype(t).itemsize)
    if fits:
        cause = (f"its size fits {tokens:,} tokens of {' / '.join(fits)}, so the .idx's token dtype "
                 f"({dtype.name}) does not match the .bin")
    elif found > expected:
        cause = f"the .bin has {found - expected:,} bytes the .idx does not describe"
    else:
        cause = "the .bin is truncated"
    raise DataError(f"{bin_} is {found:,} bytes but {idx} needs exactly {expected:,} ({len(lengths):,} sequences, "
                    f"{tokens:,} {dtype.name} tokens): {cause}; re-run tools/preprocess_data.py to rebuild both "
                    f"files, or pair this .idx with the .bin it was written with")


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> None:
    """Concatenate several datasets with the same token dtype into `output_prefix`."""
    if not prefixes:
        raise DataError("nothing to merge: give at least one input prefix")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetBuilder(output_prefix, first.dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize()
