"""A synthetic token stream for `--mock-data`: deterministic, file-free, and learnable.

Tokens follow a fixed sparse Markov chain: every token has `branching` possible successors with
skewed probabilities (drawn once from the seed). A model that learns the transitions reaches the
chain's entropy rate, far below ln(vocab), so the loss visibly falls. Sample i depends only on
(seed, stream, i), which makes the stream resumable at any sample, like the real datasets; the
train / valid / test splits are streams 0 / 1 / 2 of the same chain.
"""

from __future__ import annotations

import numpy as np
import torch


class MockGPTDataset(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 1234,
                 stream: int = 0, branching: int = 4):
        if vocab_size < 2:
            raise ValueError(f"mock data needs a vocabulary of at least 2 tokens, got {vocab_size}")
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.stream = seed, stream
        rng = np.random.default_rng(seed)
        branching = min(branching, vocab_size)
        # successors[t] are the tokens that may follow t; cumulative[t] their CDF.
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
        probs = rng.dirichlet(np.full(branching, 0.5), size=vocab_size)
        self.cumulative = np.cumsum(probs, axis=1)
        self.cumulative[:, -1] = 1.0

    def __len__(self) -> int:
        return self.num_samples

    def entropy_rate(self) -> float:
        """Entropy (nats/token) of the chain's transitions averaged uniformly over tokens: the
        loss a perfect model approaches."""
        p = np.diff(np.concatenate([np.zeros((self.vocab_size, 1)), self.cumulative], axis=1), axis=1)
        return float(-(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1).mean())

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, self.stream, index))
        n = self.seq_length + 1
        draws = rng.random(n)
        tokens = np.empty(n, dtype=np.int64)
        t = int(rng.integers(0, self.vocab_size))
        for i in range(n):
            tokens[i] = t
            t = int(self.successors[t, np.searchsorted(self.cumulative[t], draws[i], side="right")])
        return {"tokens": tokens}
