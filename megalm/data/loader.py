"""From a dataset of samples to this rank's micro-batches: the sampler, collation, worker
processes, and a check that every token id fits the model's vocabulary.

    batches = pretraining_batches(dataset, consumed_samples=0, micro_batch_size=4,
                                  data_parallel_rank=0, data_parallel_size=1, vocab_size=50257)
    next(batches)["tokens"]        # [micro_batch_size, seq_length + 1] int64
"""

from __future__ import annotations

import signal
from typing import Iterator, Optional

import torch

from megalm.data.errors import DataError
from megalm.data.sampler import PretrainingSampler


def collate_tokens(samples: list) -> dict:
    """[{"tokens": [s + 1]}] * b -> {"tokens": [b, s + 1] int64}; every other key of the samples
    (labels, position and document ids, cached teacher log-probabilities of post-training samples)
    is stacked the same way, integers as int64 and floating point as it is."""
    def stack(key):
        values = torch.stack([torch.as_tensor(s[key]) for s in samples])
        return values if values.is_floating_point() else values.long()
    return {key: stack(key) for key in samples[0]}


def ignore_termination_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the main process.

    A scheduler preempting a job signals its whole process group. The main process saves a
    checkpoint on SIGTERM (megalm.training.trainer), but a worker killed by the same signal makes the
    main process fail at its next batch ("DataLoader worker exited unexpectedly") before it gets
    there. Workers still end with the main process: the loader shuts them down, and they exit
    when their parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def checked_token_ids(batches: Iterator[dict], vocab_size: int, consumed_samples: int = 0) -> Iterator[dict]:
    """Pass the batches through, stopping at the first token id outside [0, vocab_size).

    Such an id means the data was tokenized with another, larger vocabulary; on a GPU the embedding
    lookup would otherwise end the run with a device-side assert that names nothing, and an id in
    the padding rows (between the tokenizer's size and the padded one) would train rows that no
    tokenizer can produce. The maximum of a micro-batch is taken on the CPU, before the copy to the
    device: a few microseconds."""
    for step, batch in enumerate(batches):
        tokens = batch["tokens"]
        low, top = (int(v) for v in torch.aminmax(tokens)) if tokens.numel() else (0, -1)
        if top >= vocab_size or low < 0:
            bad = top if top >= vocab_size else low
            raise DataError(
                f"micro-batch {step} after sample {consumed_samples} holds token id {bad}, but the tokenizer's "
                f"vocabulary has {vocab_size} entries: the dataset was tokenized with another tokenizer. Train "
                f"with the tokenizer the data was made with (--tokenizer-type, --tokenizer-model / --vocab-file, "
                f"or --vocab-size for pre-tokenized ids), or rerun tools/preprocess_data.py with this one "
                f"(megalm.data.check_tokenizer_fits scans a whole dataset for such ids)")
        yield batch


def pretraining_batches(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                        data_parallel_size: int = 1, num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                        vocab_size: Optional[int] = None, total_samples: Optional[int] = None) -> Iterator[dict]:
    """This rank's micro-batches of `dataset`, from sample `consumed_samples` on (see
    PretrainingSampler for which samples each rank reads); token ids checked against `vocab_size`."""
    total = len(dataset) if total_samples is None else min(total_samples, len(dataset))
    sampler = PretrainingSampler(total, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_tokens, pin_memory=pin_memory,
        worker_init_fn=ignore_termination_signals if num_workers else None,
        # A private generator: creating a loader must not consume the global RNG, or a resumed
        # run's dropout masks would drift from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed))
    return iter(loader) if not vocab_size else checked_token_ids(iter(loader), vocab_size, consumed_samples)
