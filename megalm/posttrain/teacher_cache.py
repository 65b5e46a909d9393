"""Cached teacher logits: a teacher too big to run beside the student is run once over the
post-training rows (tools/cache_teacher_logits.py), and only its top-k log-probabilities per
position are kept.

A cache directory holds one sub-directory per split (train, valid, test) with
``logprobs.npy`` (float16 [rows, seq_length, k], log-softmax at temperature 1), ``ids.npy``
(int32 [rows, seq_length, k]) and ``meta.json`` (rows, seq_length, k, the rows' fingerprint and
the teacher's path). The rows are the SFT dataset's distinct rows (`SFTDataset.row_offsets`), so
a run that reads them several times over, in any order, finds each in the cache; the fingerprint
(a hash of every row's tokens) makes a cache built from other data, another tokenizer, template,
--seq-length or --packing an error rather than silent nonsense.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from megalm.data.errors import DataError

SPLITS = ("train", "valid", "test")


def row_tokens(dataset, row: int) -> np.ndarray:
    """The input tokens of distinct row `row` of an SFTDataset, unpadded."""
    members = dataset.row_samples[dataset.row_offsets[row]: dataset.row_offsets[row + 1]]
    return np.concatenate([dataset.sample(int(k))[0] for k in members])


def num_rows(dataset) -> int:
    return len(dataset.row_offsets) - 1


def rows_fingerprint(dataset) -> str:
    digest = hashlib.sha256(f"{dataset.seq_length}".encode())
    for row in range(num_rows(dataset)):
        tokens = row_tokens(dataset, row)
        digest.update(np.int64(len(tokens)).tobytes())
        digest.update(tokens.astype(np.int64).tobytes())
    return digest.hexdigest()


def row_of(dataset, i: int) -> int:
    """The distinct row that item i of the dataset reads."""
    return int(dataset.order[i])


class TeacherLogitsWriter:
    """Fills one split's cache files row by row (written to a temporary name, renamed when full)."""

    def __init__(self, directory: str, dataset, k: int, teacher: str):
        self.directory, self.dataset, self.k = directory, dataset, k
        os.makedirs(directory, exist_ok=True)
        shape = (num_rows(dataset), dataset.seq_length, k)
        self.logprobs = np.lib.format.open_memmap(os.path.join(directory, "logprobs.npy.tmp"), "w+", np.float16, shape)
        self.ids = np.lib.format.open_memmap(os.path.join(directory, "ids.npy.tmp"), "w+", np.int32, shape)
        self.meta = {"rows": shape[0], "seq_length": shape[1], "k": k, "teacher": teacher,
                     "fingerprint": rows_fingerprint(dataset)}

    def write(self, row: int, logits: torch.Tensor) -> None:
        """The teacher's logits [seq_length, V] at every position of distinct row `row`."""
        values, ids = logits.float().log_softmax(-1).topk(self.k, dim=-1)
        n = values.shape[0]
        self.logprobs[row, :n] = values.cpu().numpy().astype(np.float16)
        self.ids[row, :n] = ids.cpu().numpy().astype(np.int32)

    def close(self) -> None:
        self.logprobs.flush()
        self.ids.flush()
        del self.logprobs, self.ids
        for name in ("logprobs.npy", "ids.npy"):
            os.replace(os.path.join(self.directory, name + ".tmp"), os.path.join(self.directory, name))
        with open(os.path.join(self.directory, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1)


class WithTeacherLogits(torch.utils.data.Dataset):
    """An SFT dataset whose items also carry the cached ``teacher_logprobs`` and ``teacher_ids``
    ([seq_length, k]) of their row."""

    def __init__(self, dataset, directory: str):
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"{directory} holds no cached teacher logits (no meta.json): write them with "
                            f"tools/cache_teacher_logits.py and the same data flags as this run")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["rows"] != num_rows(dataset) or meta["seq_length"] != dataset.seq_length \
                or meta["fingerprint"] != rows_fingerprint(dataset):
            raise DataError(f"the teacher logits in {directory} were computed for other rows ({meta['rows']} rows of "
                            f"{meta['seq_length']} tokens; this run has {num_rows(dataset)} of {dataset.seq_length}, "
                            f"or the same counts with other tokens): rebuild them with tools/cache_teacher_logits.py "
                            f"and this run's --data-path, tokenizer, --chat-template, --seq-length, --packing and "
                            f"--split")
        self.dataset = dataset
        self.logprobs = np.load(os.path.join(directory, "logprobs.npy"), mmap_mode="r")
        self.ids = np.load(os.path.join(directory, "ids.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        row = row_of(self.dataset, i)
        item["teacher_logprobs"] = torch.from_numpy(self.logprobs[row].astype(np.float32))
        item["teacher_ids"] = torch.from_numpy(self.ids[row].astype(np.int64))
        return item


def with_teacher_logits(datasets: tuple, directory: str) -> tuple:
    """(train, valid, test) with the cached teacher logits of DIR/<split> (None stays None)."""
    if not os.path.isdir(directory):
        raise DataError(f"--teacher-logits {directory}: no such directory (write it with "
                        f"tools/cache_teacher_logits.py)")
    return tuple(None if d is None else WithTeacherLogits(d, os.path.join(directory, split))
                 for d, split in zip(datasets, SPLITS))
