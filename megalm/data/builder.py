"""From `--data-path` and `--split` to the train / valid / test datasets.

`--data-path` lists dataset prefixes, optionally each preceded by a weight
(``0.3 A 0.7 B``); weights are normalised. `--split` ("969,30,1") divides the documents of every
dataset into consecutive train / valid / test ranges in those proportions (Megatron-LM's rule,
rounding each boundary). Each split of each dataset is a `GPTDataset`; several datasets are
mixed by a `BlendedDataset`. Megatron's margin applies: each part of a blend is built with 0.5%
more samples than its share, so rounding never runs it dry.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np

from megalm.data.errors import DataError
from megalm.data.indexed_dataset import bin_path, idx_path

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
BLEND_MARGIN = 1.005


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float]]:
    """``["0.3", "A", "0.7", "B"]`` / ``["A", "B"]`` -> (prefixes, normalised weights)."""
    items = [str(x) for x in data_path]
    if not items:
        raise DataError("--data-path is empty: give dataset prefixes written by tools/preprocess_data.py")
    if len(items) == 1 or not _is_number(items[0]):
        numbers = [x for x in items if _is_number(x) and not os.path.exists(idx_path(x))]
        if numbers:
            raise DataError(f"--data-path mixes weights and prefixes ({numbers[0]!r}): give either only "
                            f"prefixes (A B) or a weight before every prefix (0.3 A 0.7 B)")
        prefixes, weights = items, [1.0] * len(items)
    else:
        if len(items) % 2:
            raise DataError(f"--data-path {' '.join(items)}: weighted paths come in pairs (WEIGHT PREFIX ...), "
                            f"got an odd number of items")
        weights, prefixes = [], []
        for weight, prefix in zip(items[::2], items[1::2]):
            if not _is_number(weight):
                raise DataError(f"--data-path: {weight!r} should be a weight (a number) before prefix {prefix!r}")
            weights.append(float(weight))
            prefixes.append(prefix)
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(f"--data-path weights {weights} must be non-negative, finite and not all zero")
    for prefix in prefixes:
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                hint = " (give the prefix, without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
                raise DataError(f"--data-path {prefix}: {path} does not exist{hint}; write it with "
                                f"tools/preprocess_data.py --output-prefix ... and pass PREFIX_text_document")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_split(split: str) -> list[float]:
    """"969,30,1" (or "969/30/1") -> normalised [train, valid, test] weights."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"--split {split!r} is not a list of numbers like 969,30,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3] if len(parts) <= 3 else None
    if parts is None or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split {split!r}: give up to three non-negative numbers (train,valid,test), "
                        f"not all zero, like 969,30,1")
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(weights: Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Megatron's document ranges: boundaries at round(cumulative weight x documents)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


def build_train_valid_test_datasets(data_config, seq_length: int, num_samples: Sequence[int], seed: int):
    """(train, valid, test) datasets of ``{"tokens": int64 [seq_length + 1]}``; None for a split
    whose `--split` weight is 0. Each has at least the requested number of samples.

    A valid or test split too small to hold one sample of a dataset (few documents, short
    documents) leaves that dataset out of the split with a warning, and the split is None if no
    dataset remains; for the train split this is an error."""
    from megalm.data.blended_dataset import BlendedDataset
    from megalm.data.gpt_dataset import GPTDataset
    from megalm.data.indexed_dataset import IndexedDataset

    prefixes, weights = parse_data_path(data_config.data_path)
    split = parse_split(data_config.split)
    cache_path = getattr(data_config, "data_cache_path", None)
    indexed = [IndexedDataset(p) for p in prefixes]
    result = []
    for s, name in enumerate(SPLIT_NAMES):
        if split[s] == 0:
            result.append(None)
            continue
        requested = int(num_samples[s] or 0)
        live = []
        for ds, weight in zip(indexed, weights):
            start, end = split_ranges(split, len(ds))[s]
            if weight == 0:
                continue
            target = math.ceil(weight * requested * BLEND_MARGIN) if len(indexed) > 1 else requested
            try:
                if end <= start:
                    raise DataError(f"{ds.prefix} has {len(ds)} documents: too few to give the {name} split any "
                                    f"(--split {data_config.split}); use more documents or change --split")
                live.append((GPTDataset(ds, np.arange(start, end), seq_length, target, seed, name, cache_path),
                             weight))
            except DataError as e:
                if name == "train":
                    raise
                logger.warning("no %s data from %s: %s", name, ds.prefix, e)
        if not live:
            result.append(None)
        elif len(live) == 1:
            result.append(live[0][0])
        else:
            size = requested or min(int(len(p) / w) for p, w in live)
            result.append(BlendedDataset([p for p, _ in live], [w for _, w in live], size))
    return tuple(result)
