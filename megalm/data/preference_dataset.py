"""Preference pairs for DPO and reward models: jsonl of ``{"prompt", "chosen", "rejected"}``.

Formats (TRL's preference datasets), one JSON object per line:

- explicit prompt: ``{"prompt": P, "chosen": C, "rejected": R}`` where P, C, R are all strings
  (prompt-completion text) or all lists of messages (conversational: P the conversation so far,
  C and R the assistant's turns);
- implicit prompt: ``{"chosen": C, "rejected": R}`` whose common beginning is the prompt (TRL's
  `extract_prompt`: the longest common prefix of the two strings or message lists, a space just
  before the first difference left to the completions);
- optional ``"margin"`` (a number; reward models: how much better chosen is, 0 by default) and
  ``"tools"`` (as in SFT samples).

Each of chosen and rejected is tokenized with the prompt exactly as an SFT prompt-completion sample
(`megalm.data.chat.encode_sample`: the chat template for messages, an end-of-document token after
a string completion); the completion mask covers the completion's tokens, end-of-turn / EOS
included. The tokenized files are cached like SFT data (`megalm.data.sft_dataset`).

One pair is one row of `--seq-length` positions, shifted for next-token prediction as SFT rows are:
the chosen sample is document 0, the rejected one document 1 (position ids restarting, attention
stopping at the boundary), then padding (document 2). So one forward pass of the row gives both
sequences' log-probabilities. A reward model's rows (`shifted=False`) hold the whole samples
instead, unshifted and without labels: it reads its score at each document's last token, the
completion's EOS / end of turn, as Hugging Face's *ForSequenceClassification models do.

When the two do not fit, the longer is cut at its end (each keeps at least half the row); a pair
whose cut left one side without a completion token is dropped, and both are counted in one
warning.

    item = dataset[i]   # tokens, labels, position_ids, document_ids: int64 [s]; margin: float32 []
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import numpy as np
import torch

from megalm.data.errors import DataError
from megalm.data.sft_dataset import IGNORE_INDEX, SampleKind, SFTDataset, TokenizedSamples

logger = logging.getLogger(__name__)

CHOSEN, REJECTED = 0, 1  # document ids in a row


def extract_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the longest common prefix of the two
    strings or message lists is the prompt; a space right before the first difference stays with
    the completions."""
    end = 0
    for end in range(min(len(chosen), len(rejected)) + 1):
        if end == min(len(chosen), len(rejected)) or chosen[end] != rejected[end]:
            break
    if isinstance(chosen, str) and end > 0 and chosen[end - 1] == " ":
        end -= 1
    return chosen[:end], chosen[end:], rejected[end:]


def encode_preference(record, tokenizer, templates: dict, where: str, notes=None) -> list:
    """[(ids, mask) of prompt + chosen, (ids, mask) of prompt + rejected] of one jsonl record."""
    from megalm.data.chat import encode_sample
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} is not a preference pair (got {keys}): give \"chosen\" and \"rejected\" "
                        f"(and \"prompt\", or let their common beginning be the prompt)")
    chosen, rejected = record["chosen"], record["rejected"]
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        raise DataError(f"{where}: \"chosen\" and \"rejected\" should both be strings or both lists of messages, "
                        f"got {type(chosen).__name__} and {type(rejected).__name__}")
    prompt = record.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if "margin" in record and not _is_number(record["margin"]):
        raise DataError(f"{where}: \"margin\" should be a number, got {json.dumps(record['margin'])[:40]}")
    encoded = []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        sample = {"prompt": prompt, "completion": completion}
        if record.get("tools") is not None:
            sample["tools"] = record["tools"]
        encoded.append(encode_sample(sample, tokenizer, templates, f"{where} ({name})", notes))
    return encoded


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def read_margins(paths: list) -> np.ndarray:
    """The "margin" of every pair of the jsonl files, in order (0 where absent), float32."""
    margins = []
    for path in paths:
        with open(path, "rb") as f:
            margins += [float(json.loads(line).get("margin", 0.0)) for line in f if line.strip()]
    return np.asarray(margins, dtype=np.float32)


class PreferenceDataset(SFTDataset):
    """Rows of one pair each (module docstring): the pairs `pair_ids` of `samples` (pair k is samples
    2k, chosen, and 2k + 1, rejected), shuffled with the seed, a fresh order every epoch."""

    def __init__(self, samples: TokenizedSamples, pair_ids: np.ndarray, seq_length: int, pad_id: int,
                 seed: int, num_samples: Optional[int] = None, name: str = "train",
                 margins: Optional[np.ndarray] = None, shifted: bool = True):
        if seq_length < 2:
            raise DataError(f"--seq-length must be at least 2 to hold a preference pair, got {seq_length}")
        self.samples, self.seq_length, self.pad_id = samples, seq_length, int(pad_id)
        self.train_on_prompt, self.name = False, name
        self.margins, self.shifted = margins, shifted
        self.limits = np.full(len(samples), seq_length, dtype=np.int64)
        pairs = self._fit(np.asarray(pair_ids, dtype=np.int64))
        if not len(pairs):
            raise DataError(f"{samples.path} ({name} split) has no preference pair whose chosen and rejected "
                            f"completions both fit in --seq-length {seq_length}; use a longer --seq-length")
        self.pairs = pairs
        self.row_samples = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
        self.row_offsets = np.arange(0, 2 * len(pairs) + 1, 2, dtype=np.int64)
        positions = int(self.limits[self.row_samples].sum())
        self.stats = {"pairs": len(pairs), "rows": len(pairs), "tokens": positions,
                      "packing_efficiency": positions / (len(pairs) * seq_length)}
        rng = np.random.RandomState(seed)
        epochs = -(-int(num_samples) // len(pairs)) if num_samples else 1
        self.order = np.concatenate([rng.permutation(len(pairs)) for _ in range(epochs)])[: num_samples or len(pairs)]

    def _fit(self, pair_ids: np.ndarray) -> np.ndarray:
        """Set the positions each side may fill (`limits`); the pairs kept."""
        s, lengths = self.seq_length, self.samples.lengths
        kept, truncated = [], 0
        for pair in pair_ids:
            chosen, rejected = 2 * int(pair), 2 * int(pair) + 1
            a, b = (int(lengths[k]) - self.shifted for k in (chosen, rejected))
            if a + b > s:
                truncated += 1
                a = min(a, max(s // 2, s - b))
                b = min(b, s - a)
            self.limits[chosen], self.limits[rejected] = a, b
            if all(self.samples.get(k)[1][int(self.shifted): self.limits[k] + self.shifted].any()
                   for k in (chosen, rejected)):
                kept.append(int(pair))
        if truncated:
            logger.warning("%s (%s split): %d of %d preference pairs do not fit in --seq-length %d and were cut at "
                           "the end of the longer side; %d of them lost a whole completion and were dropped",
                           self.samples.path, self.name, truncated, len(pair_ids), s, len(pair_ids) - len(kept))
        return np.asarray(kept, dtype=np.int64)

    def max_positions(self, k: int) -> int:
        return int(self.limits[k])

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shifted as SFT samples are; unshifted (a reward model's rows): the whole sample as input,
        its last token included, and no labels."""
        if self.shifted:
            return super().sample(k)
        ids = self.samples.get(k)[0][: self.max_positions(k)].astype(np.int64)
        return ids, np.full(len(ids), IGNORE_INDEX, dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        pair = self.pairs[int(self.order[i])]
        item["margin"] = torch.tensor(float(self.margins[pair]) if self.margins is not None else 0.0)
        return item


def _dataset(samples, pair_ids, seq_length, pad_id, seed, posttrain_config, num_samples, name,
             paths) -> PreferenceDataset:
    return PreferenceDataset(samples, pair_ids, seq_length, pad_id, seed, num_samples, name, read_margins(paths),
                             shifted=posttrain_config.task != "reward")


# For megalm.data.sft_dataset.build_sft_datasets(..., kind=PREFERENCE): a line is a pair, two samples.
PREFERENCE = SampleKind("preference", "preference pairs", encode_preference, 2, _dataset)
