#!/usr/bin/env python
"""The planner's memory estimate (tools/parallel_plan.py) against what a training step really holds.

    python tools/bench/parallel_memory.py        # CPU, fp32, one process

Builds megalm's trainer for a small model and measures, with torch's own accounting:
weights (bytes of the parameters), gradients (the data-parallel gradient buffers), optimizer state
(AdamW moments after one step), and activations (bytes of the distinct tensors autograd saves for
the backward pass of one micro-batch, parameters excluded, seen through
`torch.autograd.graph.saved_tensors_hooks`), without recompute, with selective and with full
recompute. Prints each next to the planner's estimate.
"""

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import pretrain_gpt  # noqa: E402
from megalm.arguments import parse_args  # noqa: E402
from megalm.training.trainer import Trainer, build_data_iterator, split_batch  # noqa: E402
from tools.parallel_plan import Cluster, estimate  # noqa: E402

FLAGS = ["--mock-data", "--vocab-size", "2048", "--num-layers", "4", "--hidden-size", "256",
         "--num-attention-heads", "8", "--seq-length", "512", "--micro-batch-size", "4", "--global-batch-size", "4",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--eval-iters", "0", "--train-iters", "10",
         "--device", "cpu", "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear"]


def saved_activation_bytes(trainer, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    tokens, labels = split_batch(batch, trainer.state.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.model(tokens, labels)
    loss.backward()
    return sum(seen.values())


def measure(flags) -> dict:
    config, _ = parse_args(flags)
    pretrain_gpt.set_vocabulary(config)
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, log_stream=io.StringIO())
    data = build_data_iterator(trainer.datasets[0], 0, config, trainer.state)
    trainer.train_step(data)
    optimizer = trainer.optimizer.optimizer
    measured = {
        "weights": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
        "gradients": sum(b.grad.numel() * b.grad.element_size() for d in trainer.ddps for b in d.buckets),
        "optimizer": sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                         if torch.is_tensor(v) and v.dim() > 0),
        "activations": saved_activation_bytes(trainer, next(data)),
    }
    planned = estimate(config, Cluster(world_size=1), config.data.vocab_size)
    trainer.close()
    return {"measured": measured, "planned": planned}


def main(argv=None):
    extra = list(argv if argv is not None else sys.argv[1:])
    print("| recompute | quantity | planner (MiB) | measured (MiB) | planner / measured |")
    print("|---|---|---:|---:|---:|")
    for recompute in ([], ["--recompute-granularity", "selective"], ["--recompute-granularity", "full"]):
        result = measure(FLAGS + recompute + extra)
        name = recompute[-1] if recompute else "none"
        keys = ("weights", "gradients", "optimizer", "activations") if not recompute else ("activations",)
        for key in keys:
            planned, measured = result["planned"][key], result["measured"][key]
            print(f"| {name} | {key} | {planned / 2**20:.2f} | {measured / 2**20:.2f} | {planned / measured:.2f} |")


if __name__ == "__main__":
    main()
