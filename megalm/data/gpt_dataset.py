"""GPT pre-training samples from an indexed dataset, with Megatron-LM's semantics.

The documents of one split are laid end to end in a shuffled order, a fresh order per epoch (the
*document index*), and the resulting token stream is cut into samples of ``seq_length + 1``
tokens: sample i starts at stream position ``i * seq_length`` (the *sample index*), so samples run
across document boundaries and consecutive samples share one token, the last target of one being
the first input of the next. A *shuffle index* then permutes the samples. As many epochs are
built as the requested number of samples needs.

Sample i depends only on the data, the split, seq_length, num_samples and the seed, so training
can resume at any sample. The three indices are cached as `.npy` files next to the data (or under
`--data-cache-path`); a description file records the `.idx` it was built from, and a cache whose
data file changed is rebuilt. A cached index that does not load or does not fit (dtype, shape,
value range) is rebuilt with a warning; every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import numpy as np
import torch

from megalm.data.errors import DataError
from megalm.data.helpers import build_sample_index
from megalm.data.indexed_dataset import IndexedDataset, idx_path

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the meaning of the cached indices changes


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"tokens": int64 [seq_length + 1]}`` from sequences `document_ids` of `indexed`."""

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, seq_length: int, num_samples: int,
                 seed: int, name: str = "train", cache_path: Optional[str] = None):
        if seq_length <= 0:
            raise DataError(f"--seq-length must be positive, got {seq_length}")
        self.indexed = indexed
        self.seq_length = seq_length
        self.name = name
        document_ids = np.asarray(document_ids, dtype=np.int32)
        tokens_per_epoch = int(indexed.sequence_lengths[document_ids].sum(dtype=np.int64))
        if tokens_per_epoch <= seq_length:
            raise DataError(f"{indexed.prefix} ({name} split) has {tokens_per_epoch} tokens, not enough for one "
                            f"sample of --seq-length {seq_length} + 1; use more data, a shorter --seq-length "
                            f"or a larger share in --split")
        num_samples = max(int(num_samples), 1)
        self.num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
        self.description = {
            "class": "GPTDataset", "format": INDEX_FORMAT, "prefix": os.path.abspath(indexed.prefix),
            "split": name, "documents": [int(document_ids[0]), int(document_ids[-1]) + 1, len(document_ids)],
            "seq_length": seq_length, "num_samples": num_samples, "seed": seed,
        }
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build(
            document_ids, tokens_per_epoch, seed, cache_path)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the {len(self)} samples of the {self.name} dataset")
        position, offset = (int(x) for x in self.sample_index[self.shuffle_index[i]])
        needed = self.seq_length + 1
        parts = []
        while needed > 0:
            document = int(self.document_index[position])
            take = min(int(self.indexed.sequence_lengths[document]) - offset, needed)
            parts.append(self.indexed.get(document, offset, take))
            needed -= take
            position += 1
            offset = 0
        return {"tokens": np.concatenate(parts).astype(np.int64)}

    # ---- indices --------------------------------------------------------------------------------

    def _build(self, document_ids: np.ndarray, tokens_per_epoch: int, seed: int):
        rng = np.random.RandomState(seed)
        document_index = np.concatenate([rng.permutation(document_ids) for _ in range(self.num_epochs)])
        total = self._samples_built(tokens_per_epoch)
        sample_index = build_sample_index(self.indexed.sequence_lengths, document_index, self.seq_length, total)
        shuffle_index = rng.permutation(total).astype(np.int64)
        return document_index.astype(np.int32), sample_index, shuffle_index

    def _samples_built(self, tokens_per_epoch: int) -> int:
        """Samples in `num_epochs` epochs: every one needs seq_length + 1 tokens of the stream."""
        return (self.num_epochs * tokens_per_epoch - 1) // self.seq_length

    def _index_layouts(self, document_ids: np.ndarray, tokens_per_epoch: int) -> list:
        """(dtype, shape, [low, high) per column) of the document, sample and shuffle indices."""
        documents = self.num_epochs * len(document_ids)
        samples = self._samples_built(tokens_per_epoch)
        # An offset inside a document is below the dataset's token count (a bound known without
        # reading every document length, as the longest document would need).
        tokens = max(self.indexed.num_tokens, 1)
        return [(np.int32, (documents,), [(int(document_ids.min()), int(document_ids.max()) + 1)]),
                (np.int64, (samples, 2), [(0, documents), (0, tokens)]),
                (np.int64, (samples,), [(0, samples)])]

    def _load_cached(self, names: list, layouts: list) -> Optional[tuple]:
        """The cached indices, or None (with a one-line warning) when one is unreadable or does not
        fit this dataset: a truncated or overwritten file, another run's file, a foreign dtype.
        The value ranges are checked on blocks of rows spread over each file (`_rows_to_check`):
        a bounded read, whatever the size of the index."""
        arrays = []
        for name, (dtype, shape, bounds) in zip(names, layouts):
            try:
                array = np.load(name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                problem = f"unreadable: {e}"
            else:
                problem = _index_problem(array, dtype, shape, bounds)
            if problem is not None:
                logger.warning("cached dataset index %s is invalid (%s): rebuilding the indices", name, problem)
                return None
            arrays.append(array)
        return tuple(arrays)

    def _fingerprint(self) -> dict:
        stat = os.stat(idx_path(self.indexed.prefix))
        return {"idx_size": stat.st_size, "idx_mtime_ns": stat.st_mtime_ns}

    def _load_or_build(self, document_ids, tokens_per_epoch, seed, cache_path):
        directory = cache_path or os.path.join(os.path.dirname(os.path.abspath(self.indexed.prefix)), "cache")
        key = hashlib.md5(json.dumps(self.description, sort_keys=True).encode()).hexdigest()
        stem = os.path.join(directory, f"{os.path.basename(self.indexed.prefix)}-{self.name}-{key}")
        names = [f"{stem}-{part}_index.npy" for part in ("document", "sample", "shuffle")]
        description_file = f"{stem}-description.json"
        expected = dict(self.description, data=self._fingerprint())
        try:
            with open(description_file) as f:
                cached = json.load(f) == expected
        except FileNotFoundError:
            cached = False
        except (OSError, ValueError) as e:
            logger.warning("cached dataset description %s is unreadable (%s): rebuilding the indices",
                           description_file, e)
            cached = False
        if cached:
            arrays = self._load_cached(names, self._index_layouts(document_ids, tokens_per_epoch))
            if arrays is not None:
                return arrays
        arrays = self._build(document_ids, tokens_per_epoch, seed)
        try:
            os.makedirs(directory, exist_ok=True)
            for name, array in zip(names, arrays):
                _save_atomic(name, array)
            tmp = f"{description_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(expected, f, indent=1)
            os.replace(tmp, description_file)
        except OSError as e:
            logger.warning("cannot cache dataset indices in %s (%s); set --data-cache-path to a writable "
                           "directory to avoid rebuilding them every run", directory, e)
        return arrays


def _index_problem(array: np.ndarray, dtype, shape: tuple, bounds: list) -> Optional[str]:
    """Why a loaded index cannot be used, or None when its dtype, shape and values fit."""
    if array.dtype != np.dtype(dtype):
        return f"dtype {array.dtype}, expected {np.dtype(dtype)}"
    if array.shape != shape:
        return f"shape {array.shape}, expected {shape}"
    if array.size == 0:
        return None
    for column, (low, high) in zip(_rows_to_check(array).reshape(-1, array[:1].size).T, bounds):
        found_low, found_high = int(column.min()), int(column.max())
        if found_low < low or found_high >= high:
            return f"values {found_low}..{found_high} outside [{low}, {high})"
    return None


_CHECK_BLOCKS, _CHECK_BLOCK_ROWS = 32, 8192


def _rows_to_check(array: np.ndarray) -> np.ndarray:
    """All rows of a small index; of a large one, 32 contiguous blocks of 8192 rows spread from its
    first row to its last. Damage that leaves the header and the size intact (bytes overwritten with
    garbage) spans pages, which these blocks meet unless it is small; the start-up cost stays a few
    MB of reads for an index of billions of rows, on every rank."""
    rows = array.shape[0]
    if rows <= _CHECK_BLOCKS * _CHECK_BLOCK_ROWS:
        return np.asarray(array)
    starts = np.linspace(0, rows - _CHECK_BLOCK_ROWS, _CHECK_BLOCKS).astype(np.int64)
    return np.concatenate([np.asarray(array[s: s + _CHECK_BLOCK_ROWS]) for s in starts])


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)
