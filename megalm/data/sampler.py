"""Which samples each data-parallel rank reads, resumable at any consumed-sample count.

Megatron-LM's pretraining order: global batch after global batch, in dataset order (the datasets
shuffle themselves); within a batch of ``micro_batch_size x data_parallel_size`` samples, rank r
takes the r-th slice. Starting from `consumed_samples` (saved in the checkpoint) continues the
exact stream.
"""

from __future__ import annotations

from typing import Iterator


class PretrainingSampler:
    """Yields lists of sample indices, one micro-batch per iteration, for one rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is past the {total_samples} samples "
                             f"of the dataset")
        if not 0 <= data_parallel_rank < data_parallel_size or micro_batch_size <= 0:
            raise ValueError("need micro_batch_size > 0 and 0 <= data_parallel_rank < data_parallel_size")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // self.batch if self.drop_last else -(-remaining // self.batch)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, self.batch):
            end = min(start + self.batch, self.total_samples)
            if end - start < self.batch and self.drop_last:
                return
            indices = list(range(start + lo, min(start + lo + self.micro_batch_size, end)))
            if indices:
                yield indices
