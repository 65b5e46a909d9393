"""Index builders of the GPT and blended datasets: C++ when available, else numpy / Python.

Both implementations return identical arrays (the tests compare them), so a cache written by one
is valid for the other.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megalm.data import _native


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int,
                       use_native: Optional[bool] = None) -> np.ndarray:
    """[num_samples, 2] int64: for sample i, the (position in `document_index`, token offset)
    where it starts. Sample i starts at stream position i * seq_length and spans seq_length + 1
    tokens, so consecutive samples share one token (the last target is the next first input)."""
    native = _native.load("dataset") if use_native is not False else None
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int32)
    if native is not None:
        return native.build_sample_index(sizes, document_index, seq_length, num_samples)
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    starts = np.arange(num_samples, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    if num_samples and position[-1] >= len(document_index):
        raise IndexError("num_samples needs more tokens than document_index holds")
    offset = starts - (ends[position] - lengths[position]) if num_samples else starts
    return np.stack([position.astype(np.int64), offset], axis=1)


def build_blending_indices(weights: np.ndarray, size: int,
                           use_native: Optional[bool] = None) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]): sample i of the blend is
    sample dataset_sample_index[i] of dataset dataset_index[i]. Each sample goes to the dataset
    lagging its target share the most, so after n samples every dataset d holds within one sample
    of weights[d] * n."""
    native = _native.load("dataset") if use_native is not False else None
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if native is not None:
        return native.build_blending_indices(weights, size)
    w = [float(x) for x in weights]
    taken = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    datasets = range(1, len(w))
    for i in range(size):
        seen = float(i if i > 1 else 1)
        best, best_error = 0, w[0] * seen - float(taken[0])
        for d in datasets:
            error = w[d] * seen - float(taken[d])
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, dataset_sample_index
