#!/usr/bin/env python
"""What checkpoint checksums cost: megalm's save and load beside the same files written and read
without them, in one process.

A GPT-2-small-shaped model (124M parameters) with AdamW state, as a training run saves it: the
weights as safetensors, the optimizer state with torch.save. "plain" writes and reads exactly those
files with safetensors / torch.save and nothing else (what a checkpoint without checksums costs);
"megalm" is `megalm.checkpoint.save_checkpoint` / `read_checkpoint` (temporary directory, fsync,
xxHash3 of every file, metadata, rename; verification on read). Each is run --repeats times; the
median is reported. Files are read back from the page cache, which is the worst case for the
checksum's share (a cold read from disk or a network file system hides it further).

    python tools/bench/checkpoint.py
    python tools/bench/checkpoint.py --hidden-size 2048 --num-layers 16 --dir /scratch/bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from safetensors.torch import load_file, save_file  # noqa: E402

from megalm import checkpoint as ckpt  # noqa: E402
from megalm.checkpoint.files import checksum  # noqa: E402
from megalm.config import Config, ModelConfig  # noqa: E402
from megalm.model import GPTModel  # noqa: E402
from megalm.training.optimizer import build_optimizer  # noqa: E402
from megalm.training.precision import LossScaler  # noqa: E402


class _Scheduler:
    def state_dict(self) -> dict:
        return {"iteration": 1}


class _Optimizer:
    """The trainer's optimizer interface over a torch optimizer: state_dict() only."""

    def __init__(self, inner):
        self.inner = inner

    def state_dict(self) -> dict:
        return self.inner.state_dict()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Where to write (default: a temporary directory).")
    args = parser.parse_args(argv)

    model_config = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                               num_attention_heads=max(args.hidden_size // 64, 1), seq_length=1024,
                               padded_vocab_size=args.vocab_size)
    config = Config(model=model_config)
    model = GPTModel(model_config)
    optimizer = build_optimizer([(p, p) for p in model.parameters()], config.optim, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # creates exp_avg and exp_avg_sq
    params = sum(p.numel() for p in model.parameters())

    work = tempfile.mkdtemp(dir=args.dir)
    try:
        plain_dir, root = os.path.join(work, "plain"), os.path.join(work, "megalm")
        os.makedirs(plain_dir)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        opt_state = {"optimizer": optimizer.state_dict(), "scheduler": {"iteration": 1}, "loss_scaler": {}}

        def plain_save():
            save_file(weights, os.path.join(plain_dir, "model.safetensors"))
            torch.save(opt_state, os.path.join(plain_dir, "optimizer.pt"))

        def plain_load():
            load_file(os.path.join(plain_dir, "model.safetensors"))
            torch.load(os.path.join(plain_dir, "optimizer.pt"), weights_only=True)

        def megalm_save():
            ckpt.save_checkpoint(root, 1, model, config, _Optimizer(optimizer), _Scheduler(), LossScaler())

        path = ckpt.iteration_dir(root, 1)
        rows = []
        t_plain_save, t_megalm_save = median_time(plain_save, args.repeats), median_time(megalm_save, args.repeats)
        files = [os.path.join(path, rel) for rel in ckpt.read_metadata(path)["files"]]
        size = sum(os.path.getsize(f) for f in files)
        t_hash = median_time(lambda: [checksum(f) for f in files], args.repeats)
        t_plain_load = median_time(plain_load, args.repeats)
        t_noverify = median_time(lambda: ckpt.read_checkpoint(path, verify=False), args.repeats)
        t_verify = median_time(lambda: ckpt.read_checkpoint(path, verify=True), args.repeats)
        rows.append(("save: safetensors + torch.save", t_plain_save, 1.0))
        rows.append(("save: megalm (fsync, checksums, rename)", t_megalm_save, t_megalm_save / t_plain_save))
        rows.append(("  of which xxHash3 of every file", t_hash, t_hash / t_plain_save))
        rows.append(("load: safetensors + torch.load", t_plain_load, 1.0))
        rows.append(("load: megalm --no-verify-checkpoint", t_noverify, t_noverify / t_plain_load))
        rows.append(("load: megalm, checksums verified", t_verify, t_verify / t_plain_load))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"model {params / 1e6:.0f}M parameters, checkpoint {size / 2**20:.0f} MiB "
          f"(weights + AdamW state), {args.repeats} repeats, median; xxHash3 {size / t_hash / 2**30:.2f} GiB/s")
    print(f"{'':44s} {'seconds':>8s} {'vs plain':>9s}")
    for name, seconds, ratio in rows:
        print(f"{name:44s} {seconds:8.3f} {ratio:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
