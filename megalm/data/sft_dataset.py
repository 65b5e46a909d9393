"""Supervised fine-tuning datasets: tokenized jsonl, cached on disk, in rows of `seq_length`.

Each jsonl file (formats and loss masks: `megalm.data.chat`) is tokenized once into three arrays,
the token ids and loss mask of every sample laid end to end and the offsets where samples start,
cached as `.npy` next to the data (or under `--data-cache-path`) under a key that hashes the
file's bytes, the tokenizer and the chat templates: a second run, and every rank, reuse it, and
any change to one of the three builds a new cache. In a distributed run rank 0 builds while the
others wait, then they load what it wrote (a rank that cannot see it, on a node-local disk,
builds its own copy).

`--split` divides the samples of each file into consecutive train / valid / test ranges in those
proportions, Megatron-LM's rule for documents (`megalm.data.builder.split_ranges`).

Every item is a dict of int64 tensors of length seq_length, already shifted for next-token
prediction within each sample (a sample never predicts the next sample's first token):

    tokens        [s]  input ids; padding is the tokenizer's pad id, else its end-of-document id
    labels        [s]  the next token where it is trained on, -100 elsewhere (prompt, padding)
    position_ids  [s]  0, 1, ... restarting at each sample (and for the padding)
    document_ids  [s]  0 for the row's first sample, 1 for its second, ...; padding gets the
                       next id, so the ids never decrease along a row

A sample of n tokens fills n - 1 positions. One longer than seq_length + 1 tokens is truncated to
its first seq_length + 1 (counted, one warning); if no trained token is left, it is dropped
(counted too). Unpacked, each row holds one sample, right-padded. With `--packing` rows hold
several samples, never splitting one: best-fit decreasing (samples by length, longest first, each
into the row whose free space fits it most tightly, a new row when none does), deterministic for
given data. Rows are shuffled with the seed, a fresh order every epoch.

    train, valid, test = build_sft_datasets(config.data, config.posttrain, seq_length, seed,
                                            num_samples=[train_rows, valid_rows, 0])
    loader = DataLoader(train, batch_sampler=PretrainingSampler(len(train), consumed, micro_batch_size,
                                                                dp_rank, dp_size), collate_fn=collate_sft)
    next(iter(loader))["labels"]        # [micro_batch_size, seq_length] int64
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from megalm.data.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the meaning of the cached arrays changes
IGNORE_INDEX = -100
ITEM_KEYS = ("tokens", "labels", "position_ids", "document_ids")


class TokenizedSamples:
    """The samples of one jsonl file: ids int32 and loss mask uint8 laid end to end, sample k at
    ``offsets[k]:offsets[k + 1]``."""

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray, path: str):
        self.tokens, self.loss_mask, self.offsets, self.path = tokens, loss_mask, offsets, path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        return self.tokens[start:end], self.loss_mask[start:end]


# ---- tokenizing and caching ----------------------------------------------------------------------


class SampleKind(NamedTuple):
    """What the lines of a jsonl file are, for the functions here: the name its cache and messages
    use, `encode(record, tokenizer, templates, where, notes)` -> the [(ids, mask)] samples of one
    line, how many samples a line makes (the unit `--split` divides), and `dataset(samples,
    unit_ids, seq_length, pad_id, seed, posttrain_config, num_samples, name, paths)` -> a Dataset."""
    name: str
    what: str
    encode: Callable
    samples_per_line: int
    dataset: Callable


def tokenize_file(path: str, tokenizer, templates: dict, progress: Optional[bool] = None,
                  kind: Optional[SampleKind] = None) -> TokenizedSamples:
    """Tokenize every sample of a jsonl file (blank lines skipped); errors name the line. `kind`:
    what a line is (default SFT samples, one per line)."""
    from megalm.data.progress import Progress

    encode = (kind or SFT).encode
    tokens, masks, lengths, notes, records = [], [], [], Counter(), 0
    with open(path, "rb") as f, Progress(f"tokenizing {os.path.basename(path)}", os.path.getsize(path),
                                         enabled=progress) as bar:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                records += 1
                where = f"sample {records} of {path} (line {line_number})"
                record = _parse_line(line, where)
                try:
                    encoded = encode(record, tokenizer, templates, where, notes)
                except DataError:
                    raise
                except ValueError as e:  # the tokenizer's own complaint (NullTokenizer: not ids)
                    raise DataError(f"{where}: the {tokenizer.name} tokenizer cannot encode it: {e}") from None
                for ids, mask in encoded:
                    tokens.append(ids)
                    masks.append(mask)
                    lengths.append(len(ids))
                bar.update(len(line), documents=1, tokens=sum(len(ids) for ids, _ in encoded))
            else:
                bar.update(len(line))
    if not lengths:
        raise DataError(f"{path} holds no samples: give a jsonl file with one JSON object per line")
    if notes["merged_across_turns"]:
        logger.warning("%s: in %d of %d samples the tokenizer merges text across a turn boundary (a message that "
                       "starts with whitespace?): their tokens overlapping an assistant turn are trained on",
                       path, notes["merged_across_turns"], len(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return TokenizedSamples(np.concatenate(tokens), np.concatenate(masks), offsets, path)


def _parse_line(line: bytes, where: str):
    try:
        return json.loads(line)
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 ({e.reason} at byte {e.start}); re-encode the file") from None
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e}); each line must be one JSON object") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest that changes whenever the tokenizer would encode differently: its file's bytes, or
    its full vocabulary and merges for tokenizers built in memory."""
    digest = hashlib.md5(repr(tokenizer).encode())
    for attribute in ("path", "model_file"):
        path = getattr(tokenizer, attribute, None)
        if isinstance(path, str) and os.path.isfile(path):
            return _file_digest(path, digest)
    if hasattr(tokenizer, "to_hf_json"):
        digest.update(json.dumps(tokenizer.to_hf_json(), sort_keys=True).encode())
    return digest.hexdigest()


def _file_digest(path: str, digest=None) -> str:
    digest = digest or hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenized_file(path: str, tokenizer, templates: dict, cache_path: Optional[str] = None,
                   progress: Optional[bool] = None, kind: Optional[SampleKind] = None) -> TokenizedSamples:
    """The tokenized samples of `path` (`tokenize_file`), from the cache when it holds them (built
    and cached otherwise; rank 0 first in a distributed run)."""
    kind = kind or SFT
    if not os.path.isfile(path):
        raise DataError(f"--data-path {path}: no such file; give jsonl files of {kind.what}")
    description = {
        "class": "TokenizedSamples", "format": CACHE_FORMAT, "kind": kind.name, "data": _file_digest(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "templates": {name: [t.text, t.special_tokens] for name, t in sorted(templates.items())},
    }
    key = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
    directory = cache_path or os.path.join(os.path.dirname(os.path.abspath(path)), "cache")
    stem = os.path.join(directory, f"{os.path.basename(path)}-{kind.name}-{key}")

    def load_or_build() -> TokenizedSamples:
        cached = _load_cached(stem, path)
        if cached is not None:
            return cached
        samples = tokenize_file(path, tokenizer, templates, progress, kind)
        _save(stem, samples, description, directory)
        return samples

    return _rank_zero_first(load_or_build)


_CACHE_PARTS = {"tokens": np.int32, "loss_mask": np.uint8, "offsets": np.int64}


def _load_cached(stem: str, path: str) -> Optional[TokenizedSamples]:
    """The cached samples, or None when there are none (or, with a warning, when the files are
    unreadable or do not fit together: a crash between two writes, another tool's file)."""
    if not os.path.isfile(f"{stem}-description.json"):
        return None
    try:
        with open(f"{stem}-description.json") as f:
            described = int(json.load(f)["samples"])
        arrays = {part: np.load(f"{stem}-{part}.npy", mmap_mode="r", allow_pickle=False) for part in _CACHE_PARTS}
    except (OSError, ValueError, EOFError, LookupError, TypeError) as e:
        logger.warning("cached SFT samples %s-* are unreadable (%s): tokenizing %s again", stem, e, path)
        return None
    offsets = arrays["offsets"]
    fits = (all(arrays[p].dtype == np.dtype(t) and arrays[p].ndim == 1 for p, t in _CACHE_PARTS.items())
            and len(offsets) == described + 1 and described >= 1 and offsets[0] == 0
            and len(arrays["tokens"]) == len(arrays["loss_mask"]) == offsets[-1]
            and bool(np.all(np.diff(offsets) > 0)))
    if not fits:
        logger.warning("cached SFT samples %s-*.npy do not fit together: tokenizing %s again", stem, path)
        return None
    return TokenizedSamples(arrays["tokens"], arrays["loss_mask"], np.asarray(offsets), path)


def _save(stem: str, samples: TokenizedSamples, description: dict, directory: str) -> None:
    """Write the arrays, then the description that marks the cache complete (each atomically)."""
    try:
        os.makedirs(directory, exist_ok=True)
        for part in _CACHE_PARTS:
            tmp = f"{stem}-{part}.tmp{os.getpid()}.npy"
            np.save(tmp, getattr(samples, part), allow_pickle=False)
            os.replace(tmp, f"{stem}-{part}.npy")
        tmp = f"{stem}-description.json.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dict(description, source=os.path.abspath(samples.path), samples=len(samples)), f, indent=1)
        os.replace(tmp, f"{stem}-description.json")
    except OSError as e:
        logger.warning("cannot cache tokenized SFT samples in %s (%s); set --data-cache-path to a writable "
                       "directory to avoid tokenizing again every run", directory, e)


def _rank_zero_first(build):
    """`build()` on rank 0 while the other ranks wait, then on them (which then finds rank 0's
    cache). An error on rank 0 is raised on every rank, so no rank waits for ever."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return build()
    outcome, result = [None], None
    if torch.distributed.get_rank() == 0:
        try:
            result = build()
        except Exception as e:
            outcome = [str(e) if isinstance(e, DataError) else f"rank 0 failed to tokenize the SFT data: {e!r}"]
            torch.distributed.broadcast_object_list(outcome, src=0)
            raise
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise DataError(outcome[0])
    return result if result is not None else build()


# ---- rows -------------------------------------------------------------------------------------------


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices: longest sample first, each into the row with the least free space that
    still fits it, else a new row. Equal lengths go in sample order, and among rows with the same free
    space the one that reached it last is filled first, so the result depends only on `lengths`.
    Finding that row is one scan of a `capacity + 1` flag array per sample (numpy)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"sample lengths must be in [1, {capacity}]")
    rows: list[list[int]] = []
    rows_with_free = [[] for _ in range(capacity + 1)]  # free space -> rows with exactly that much
    has_rows = np.zeros(capacity + 1, dtype=bool)
    for k in np.argsort(-lengths, kind="stable"):
        need = int(lengths[k])
        fits = np.flatnonzero(has_rows[need:])
        if len(fits):
            free = need + int(fits[0])
            row = rows_with_free[free].pop()
            has_rows[free] = bool(rows_with_free[free])
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(int(k))
        rows_with_free[free - need].append(row)
        has_rows[free - need] = True
    return rows


class SFTDataset(torch.utils.data.Dataset):
    """Rows ``{"tokens", "labels", "position_ids", "document_ids"}``, int64 [seq_length] each, of the
    samples `sample_ids` of `samples` (see the module docstring)."""

    def __init__(self, samples: TokenizedSamples, sample_ids: np.ndarray, seq_length: int, pad_id: int,
                 seed: int, packing: bool = False, train_on_prompt: bool = False,
                 num_samples: Optional[int] = None, name: str = "train"):
        if seq_length <= 0:
            raise DataError(f"--seq-length must be positive, got {seq_length}")
        self.samples, self.seq_length, self.pad_id = samples, seq_length, int(pad_id)
        self.train_on_prompt, self.name = train_on_prompt, name
        sample_ids, positions, truncated, dropped = self._fit(np.asarray(sample_ids, dtype=np.int64))
        if not len(sample_ids):
            raise DataError(f"{samples.path} ({name} split) has no sample with a token to train on within "
                            f"--seq-length {seq_length}; use a longer --seq-length or more data")
        groups = (pack_best_fit_decreasing(positions, seq_length) if packing
                  else [[k] for k in range(len(sample_ids))])
        self.row_samples = np.concatenate([sample_ids[g] for g in groups])
        self.row_offsets = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
        self.stats = {"samples": len(sample_ids), "rows": len(groups), "tokens": int(positions.sum()),
                      "truncated": truncated, "dropped": dropped,
                      "packing_efficiency": float(positions.sum()) / (len(groups) * seq_length)}
        rows = len(groups)
        epochs = -(-int(num_samples) // rows) if num_samples else 1
        rng = np.random.RandomState(seed)
        self.order = np.concatenate([rng.permutation(rows) for _ in range(epochs)])[: num_samples or rows]

    def _fit(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(the samples that keep a trained token after truncation, the positions each fills, how
        many were truncated and kept, how many dropped)."""
        lengths = self.samples.lengths[sample_ids]
        positions = np.minimum(lengths - 1, self.seq_length)
        truncated = np.flatnonzero(lengths - 1 > self.seq_length)
        dropped = [k for k in truncated if not self.train_on_prompt
                   and not self.samples.get(int(sample_ids[k]))[1][1: self.seq_length + 1].any()]
        if len(truncated):
            logger.warning("%s (%s split): %d of %d samples are longer than --seq-length %d + 1 tokens and were "
                           "truncated; %d of them kept no trained token and were dropped",
                           self.samples.path, self.name, len(truncated), len(sample_ids), self.seq_length,
                           len(dropped))
        keep = np.ones(len(sample_ids), dtype=bool)
        keep[dropped] = False
        return sample_ids[keep], positions[keep], len(truncated) - len(dropped), len(dropped)

    def __len__(self) -> int:
        return len(self.order)

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of sample k, shifted and truncated: int64 [min(n - 1, seq_length)]."""
        ids, mask = self.samples.get(k)
        keep = self.max_positions(k) + 1
        ids, mask = ids[:keep].astype(np.int64), mask[:keep]
        labels = ids[1:].copy()
        if not self.train_on_prompt:
            labels[mask[1:] == 0] = IGNORE_INDEX
        return ids[:-1], labels

    def max_positions(self, k: int) -> int:
        """The most positions sample k may fill (it is truncated beyond)."""
        return self.seq_length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is outside the {len(self)} rows of the {self.name} SFT dataset")
        row = int(self.order[i])
        s = self.seq_length
        item = {"tokens": np.full(s, self.pad_id, dtype=np.int64),
                "labels": np.full(s, IGNORE_INDEX, dtype=np.int64),
                "position_ids": np.zeros(s, dtype=np.int64), "document_ids": np.zeros(s, dtype=np.int64)}
        members = self.row_samples[self.row_offsets[row]: self.row_offsets[row + 1]]
        start = 0
        for document, k in enumerate(members):
            inputs, labels = self.sample(int(k))
            end = start + len(inputs)
            item["tokens"][start:end], item["labels"][start:end] = inputs, labels
            item["position_ids"][start:end] = np.arange(len(inputs))
            item["document_ids"][start:end] = document
            start = end
        item["position_ids"][start:] = np.arange(s - start)
        item["document_ids"][start:] = len(members)
        return {key: torch.from_numpy(value) for key, value in item.items()}

    def loss_token_count(self) -> int:
        """Trained positions over one pass of the rows (reads every sample)."""
        return sum(int((self.sample(int(k))[1] != IGNORE_INDEX).sum()) for k in self.row_samples)


def collate_sft(items: list) -> dict:
    """[{key: [s]}] * b -> {key: [b, s] int64} for the four keys of an SFT row."""
    return {key: torch.stack([item[key] for item in items]) for key in ITEM_KEYS}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its end-of-document id, else 0 (padding is never trained on)."""
    for value in (getattr(tokenizer, "pad", None), tokenizer.eod):
        if value is not None:
            return int(value)
    return 0


def build_sft_datasets(data_config, posttrain_config, seq_length: int, seed: int, tokenizer=None,
                       num_samples: Optional[Sequence[Optional[int]]] = None, progress: Optional[bool] = None,
                       kind: Optional[SampleKind] = None):
    """(train, valid, test) SFTDatasets for the jsonl files of `--data-path`, None for a split whose
    `--split` weight is 0 (or, for valid and test, that gets no sample). Several files are read as
    one dataset. `num_samples` asks each split for at least that many rows (more epochs). `kind`:
    what the lines are and the datasets they make (default SFT samples; preference pairs:
    `megalm.data.preference_dataset.PREFERENCE`)."""
    from megalm.data.builder import SPLIT_NAMES, parse_split, split_ranges
    from megalm.data.chat import load_chat_templates, tokenizer_directory
    from megalm.data.tokenizer import build_tokenizer

    kind = kind or SFT

    paths = [str(p) for p in data_config.data_path or []]
    if not paths:
        raise DataError(f"--data-path is empty: give jsonl files of {kind.what}")
    tokenizer = tokenizer or build_tokenizer(data_config)
    templates = load_chat_templates(tokenizer_directory(data_config), tokenizer, posttrain_config.chat_template)
    files = [tokenized_file(p, tokenizer, templates, data_config.data_cache_path, progress, kind) for p in paths]
    samples = _concatenate(files)
    per_unit = kind.samples_per_line
    split = parse_split(data_config.split)
    ranges, first = [[] for _ in SPLIT_NAMES], 0
    for part in files:
        units = len(part) // per_unit
        for s, (start, end) in enumerate(split_ranges(split, units)):
            ranges[s].append(np.arange(first + start, first + end))
        first += units
    datasets = []
    for s, name in enumerate(SPLIT_NAMES):
        ids = np.concatenate(ranges[s])
        if split[s] == 0 or (not len(ids) and name != "train"):
            datasets.append(None)
            continue
        if not len(ids):
            raise DataError(f"{', '.join(paths)}: {len(samples) // per_unit} samples are too few to give the train "
                            f"split any (--split {data_config.split}); use more samples or change --split")
        requested = num_samples[s] if num_samples else None
        try:
            datasets.append(kind.dataset(samples, ids, seq_length, pad_token_id(tokenizer), seed, posttrain_config,
                                         requested, name, paths))
        except DataError as e:
            if name == "train":
                raise
            logger.warning("no %s data: %s", name, e)
            datasets.append(None)
    return tuple(datasets)


def _concatenate(files: list) -> TokenizedSamples:
    if len(files) == 1:
        return files[0]
    bases = np.cumsum([0] + [int(f.offsets[-1]) for f in files[:-1]])
    offsets = [files[0].offsets] + [f.offsets[1:] + base for f, base in zip(files[1:], bases[1:])]
    return TokenizedSamples(np.concatenate([f.tokens for f in files]),
                            np.concatenate([f.loss_mask for f in files]),
                            np.concatenate(offsets), ", ".join(f.path for f in files))


def _encode_sft(record, tokenizer, templates: dict, where: str, notes: Counter) -> list:
    from megalm.data.chat import encode_sample
    return [encode_sample(record, tokenizer, templates, where, notes)]


def _sft_dataset(samples, ids, seq_length, pad_id, seed, posttrain_config, num_samples, name, paths) -> SFTDataset:
    return SFTDataset(samples, ids, seq_length, pad_id, seed, posttrain_config.packing,
                      posttrain_config.train_on_prompt, num_samples, name)


SFT = SampleKind("sft", "SFT samples", _encode_sft, 1, _sft_dataset)
