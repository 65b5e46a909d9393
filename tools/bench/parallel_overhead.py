#!/usr/bin/env python
"""The cost of the parallel machinery when there is no parallelism (TP = PP = DP = 1).

    python tools/bench/parallel_overhead.py                     # CPU-sized model
    python tools/bench/parallel_overhead.py --device cuda --hidden-size 2048 --num-layers 16 \\
        --seq-length 2048 --micro-batch-size 4 --bf16

Times, in one process and alternating, (a) megalm's training step (`Trainer.train_step`: gradient
buckets, the pipeline schedule's micro-batch loop, the global gradient norm, the optimizer wrapper)
and (b) the plain PyTorch step on the same `GPTModel`: forward, backward,
`torch.nn.utils.clip_grad_norm_`, `AdamW.step()`. Prints the median and the minimum time of each
and their ratios (the minimum is the one to trust on a busy machine).
"""

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import pretrain_gpt  # noqa: E402
from megalm.arguments import parse_args  # noqa: E402
from megalm.training.precision import autocast  # noqa: E402
from megalm.training.trainer import Trainer, build_data_iterator, split_batch  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--repeats", type=int, default=7)
    extra.add_argument("--steps", type=int, default=5, help="Steps per timed repeat.")
    ns, rest = extra.parse_known_args(argv)
    flags = ["--mock-data", "--vocab-size", "1024", "--num-layers", "4", "--hidden-size", "256",
             "--num-attention-heads", "8", "--seq-length", "256", "--micro-batch-size", "4",
             "--attention-dropout", "0", "--hidden-dropout", "0", "--eval-iters", "0",
             "--train-iters", "1000", "--log-interval", "1000"] + rest
    config, _ = parse_args(flags)
    pretrain_gpt.set_vocabulary(config)
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, log_stream=io.StringIO())
    device, dtype = trainer.state.device, trainer.dtype
    data = build_data_iterator(trainer.datasets[0], 0, config, trainer.state)

    torch.manual_seed(0)
    plain = pretrain_gpt.model_provider(config).to(device)
    plain.load_state_dict(trainer.model.state_dict())
    optimizer = torch.optim.AdamW(plain.parameters(), lr=config.optim.lr, fused=device.type == "cuda",
                                  foreach=None if device.type == "cuda" else True)
    accumulation = trainer.num_microbatches

    def plain_step():
        optimizer.zero_grad(set_to_none=False)
        for _ in range(accumulation):
            tokens, labels = split_batch(next(data), device)
            with autocast(device, dtype):
                loss = plain(tokens, labels)
            (loss.float() / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), config.optim.clip_grad)
        optimizer.step()

    def megalm_step():
        trainer.train_step(data)

    timings = {"megalm": [], "plain": []}
    for fn in (megalm_step, plain_step):  # warm-up
        fn()
    for _ in range(ns.repeats):
        for name, fn in (("megalm", megalm_step), ("plain", plain_step)):
            _sync(device)
            start = time.perf_counter()
            for _ in range(ns.steps):
                fn()
            _sync(device)
            timings[name].append((time.perf_counter() - start) / ns.steps)
    print(f"device {device} | {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
          f"seq {config.model.seq_length}, micro batch {config.train.micro_batch_size} | "
          f"{ns.repeats} x {ns.steps} steps")
    for stat in (statistics.median, min):
        m, p = stat(timings["megalm"]), stat(timings["plain"])
        print(f"{stat.__name__:>6}: megalm train_step (TP=PP=DP=1) {1e3 * m:.2f} ms | plain PyTorch step "
              f"{1e3 * p:.2f} ms | ratio {m / p:.3f} ({100 * (m / p - 1):+.1f}%)")
    trainer.close()


if __name__ == "__main__":
    main()
