#!/usr/bin/env python
"""Run a distillation teacher once over the post-training rows and keep its top-k log-probabilities.

    python tools/cache_teacher_logits.py --task distill --load STUDENT --teacher-load TEACHER \\
        --teacher-logits CACHE --data-path chat.jsonl --seq-length 2048 --packing --teacher-top-k 64
    python posttrain_gpt.py --task distill --load STUDENT --teacher-logits CACHE --data-path chat.jsonl \\
        --seq-length 2048 --packing ...   # the same data flags: the cache checks it got the same rows

Takes posttrain_gpt.py's command line (the data flags must be the run's: the rows are built the same
way) plus --teacher-top-k. Writes CACHE/train, CACHE/valid, CACHE/test (the splits the run has), each
replacing its files only once complete (see megalm.posttrain.teacher_cache).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import posttrain_gpt  # noqa: E402
from megalm.arguments import parse_args  # noqa: E402
from megalm.checkpoint import CheckpointError  # noqa: E402
from megalm.config import ConfigError  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402
from megalm.training.launch import report_error  # noqa: E402


def _extra(parser):
    parser.add_argument("--teacher-top-k", type=int, default=64, metavar="K",
                        help="Log-probabilities kept per position (default: 64).")


def cache(config, top_k: int, log=print) -> dict:
    """Write the cache of every split; returns {split: rows}."""
    from megalm.data.sft_dataset import build_sft_datasets
    from megalm.posttrain.distill import load_teacher
    from megalm.posttrain.teacher_cache import SPLITS, TeacherLogitsWriter, num_rows
    p = config.posttrain
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if config.train.bf16 else torch.float16 if config.train.fp16 else torch.float32
    teacher = load_teacher(p.teacher_load, config, device, dtype)
    vocab = config.model.vocab_size
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--teacher-top-k must be between 1 and the vocabulary size {vocab}, got {top_k}")
    written = {}
    for split, dataset in zip(SPLITS, build_sft_datasets(config.data, p, config.model.seq_length, config.train.seed)):
        if dataset is None:
            continue
        writer = TeacherLogitsWriter(os.path.join(p.teacher_logits, split), dataset, top_k, os.path.abspath(p.teacher_load))
        rows, start = num_rows(dataset), time.time()
        item_of_row = np.empty(rows, dtype=np.int64)
        item_of_row[dataset.order[:rows]] = np.arange(rows)  # one pass: the order is a permutation of the rows
        for row in range(rows):
            item = {key: value[None].to(device) for key, value in dataset[int(item_of_row[row])].items()}
            with torch.no_grad():
                logits = teacher(item["tokens"], position_ids=item["position_ids"], document_ids=item["document_ids"])
            writer.write(row, logits[0, :, :vocab])
            if (row + 1) % 100 == 0 or row + 1 == rows:
                rate = (row + 1) / max(time.time() - start, 1e-9)
                log(f"{split}: {row + 1}/{rows} rows | {rate:.1f} rows/s | ETA {(rows - row - 1) / rate:.0f}s")
        writer.close()
        written[split] = rows
    return written


def main(argv=None) -> int:
    try:
        config, ns = parse_args(argv, extra=_extra, description=__doc__.split("\n\n")[0],
                                sections=posttrain_gpt.SECTIONS)
        if not config.posttrain.teacher_load or not config.posttrain.teacher_logits:
            raise ConfigError("give the teacher with --teacher-load DIR and where to write its logits with "
                              "--teacher-logits DIR")
        config.posttrain.task = "distill"
        posttrain_gpt.resume_or_start(config, ns)
        posttrain_gpt.set_vocabulary(config)
        written = cache(config, ns.teacher_top_k)
    except (ConfigError, CheckpointError, DataError, OSError, ValueError) as e:
        return report_error(str(e))
    print(f"wrote the teacher's top-{ns.teacher_top_k} log-probabilities of {written} rows to {config.posttrain.teacher_logits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
