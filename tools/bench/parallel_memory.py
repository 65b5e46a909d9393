#!/usr/bin/env python
"""The planner's memory estimate (tools/parallel_plan.py) against what a training step really holds.

    python tools/bench/parallel_memory.py                # CPU, fp32, one process
    python tools/bench/parallel_memory.py --strategies   # each ZeRO stage at DP 2 and 4 (torchrun, gloo)

Builds megalm's trainer for a small model and measures, with torch's own accounting:
weights (bytes of the parameters), gradients (the data-parallel gradient buffers), optimizer state
(AdamW moments after one step), and activations (bytes of the distinct tensors autograd saves for
the backward pass of one micro-batch, parameters excluded, seen through
`torch.autograd.graph.saved_tensors_hooks`), without recompute, with selective and with full
recompute. Prints each next to the planner's estimate.

`--strategies` trains the same model under torchrun at DP 2 and DP 4 (gloo) for every
--data-parallel-sharding-strategy and reports per rank: the model state held between steps
(weights, gradients, optimizer state: distinct storages), its peak during the step (sampled at
every gather, forward and gradient hook), the mean step time, and the bytes each rank sends per step
in the data-parallel all-gathers and reductions (ring volume: (n - 1) / n of a reduce-scatter's
input or an all-gather's output, twice that for an all-reduce), each next to the planner's.
"""

import io
import json
import os
import subprocess
import sys
import time
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


STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
STEPS = 3  # the first is not timed (allocations, the optimizer's state)


class _Traffic:
    """Counts the ring bytes of megalm.parallel.data_parallel's collectives (and only those)."""

    def __init__(self, data_parallel):
        import torch.distributed as dist
        self.bytes = {"gather": 0.0, "reduce": 0.0}
        dp, self.dist = data_parallel, dist

        def ring(t, group):
            n = dist.get_world_size(group)
            return t.numel() * t.element_size() * (n - 1) / n

        def all_gather_into(output, shard, group, async_op=False, _f=dp.all_gather_into):
            self.bytes["gather"] += ring(output, group)
            return _f(output, shard, group, async_op)

        def reduce_scatter_into(output, full, group, async_op=False, _f=dp.reduce_scatter_into):
            self.bytes["reduce"] += ring(full, group)
            return _f(output, full, group, async_op)

        class Dist:  # the torch.distributed the module sees: all_reduce counted, the rest as is
            def __getattr__(_, name):
                return getattr(dist, name)

            @staticmethod
            def all_reduce(t, group=None, async_op=False):
                self.bytes["reduce"] += 2 * ring(t, group or dist.group.WORLD)
                return dist.all_reduce(t, group=group, async_op=async_op)

        dp.all_gather_into, dp.reduce_scatter_into, dp.dist = all_gather_into, reduce_scatter_into, Dist()


def _peak_sampler(trainer):
    """Records the largest model state (weights and gradients) seen at any hook of a step."""
    from megalm.parallel.data_parallel import storage_bytes
    peak = [0]

    def sample(*_):
        held = [ddp.state_tensors() for ddp in trainer.ddps]
        peak[0] = max(peak[0], storage_bytes([t for w, g in held for t in w + g]))

    for chunk in trainer.chunks:
        for module in chunk.modules():
            module.register_forward_hook(sample)
        for p in chunk.parameters():
            p.register_post_accumulate_grad_hook(sample)
    return peak


def measure_strategy(flags) -> dict:
    """One strategy in the launched process group: this rank's numbers."""
    from megalm.parallel import data_parallel
    from megalm.parallel.data_parallel import storage_bytes
    traffic = _Traffic(data_parallel)
    config, _ = parse_args(flags)
    pretrain_gpt.set_vocabulary(config)
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, log_stream=io.StringIO())
    data = build_data_iterator(trainer.datasets[0], 0, config, trainer.state)
    trainer.train_step(data)
    peak = _peak_sampler(trainer)
    traffic.bytes = {"gather": 0.0, "reduce": 0.0}
    start = time.perf_counter()
    for _ in range(STEPS - 1):
        trainer.train_step(data)
    step = (time.perf_counter() - start) / (STEPS - 1)
    held = [ddp.state_tensors() for ddp in trainer.ddps]
    result = {"weights": storage_bytes([t for w, _ in held for t in w]),
              "gradients": storage_bytes([t for _, g in held for t in g]),
              "optimizer": storage_bytes(trainer.optimizer.state_tensors()), "peak": peak[0],
              "step_seconds": step, **{k: v / (STEPS - 1) for k, v in traffic.bytes.items()}}
    trainer.close()
    return result


def strategy_flags(strategy: str, dp: int, extra: list) -> list:
    # two micro-batches per step: ZeRO-2/3 reduce after each
    return FLAGS + ["--global-batch-size", str(8 * dp), "--data-parallel-sharding-strategy", strategy,
                    "--ddp-bucket-size", "1000000"] + extra


def _worker() -> None:
    import torch.distributed as dist
    extra = json.loads(os.environ["MEGALM_BENCH_EXTRA"])
    results = {}
    for strategy in STRATEGIES:  # the first Trainer starts the process group
        results[strategy] = measure_strategy(strategy_flags(strategy, int(os.environ["WORLD_SIZE"]), extra))
    if dist.get_rank() == 0:
        with open(os.environ["MEGALM_BENCH_OUT"], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def strategies_table(extra: list) -> None:
    import tempfile
    print("| DP | strategy | weights MiB | gradients MiB | optimizer MiB | peak model state MiB | step s | "
          "all-gather MiB/step | reduce MiB/step |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    mib = 2 ** 20
    for dp in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            env = dict(os.environ, MEGALM_BENCH_WORKER="1", MEGALM_BENCH_EXTRA=json.dumps(extra), MEGALM_BENCH_OUT=out,
                       OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp}", __file__]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"error: the DP {dp} run failed:\n{done.stderr[-3000:]}")
            with open(out) as f:
                results = json.load(f)
        for strategy, m in results.items():
            config, _ = parse_args(strategy_flags(strategy, dp, extra))
            plan = estimate(config, Cluster(world_size=dp), config.data.vocab_size)
            peak_plan = plan["weights"] + plan["gradients"] + plan["zero_working"]
            cells = [f"{m[k] / mib:.2f} / {plan[k] / mib:.2f}" for k in ("weights", "gradients", "optimizer")]
            cells.append(f"{m['peak'] / mib:.2f} / {peak_plan / mib:.2f}")
            cells.append(f"{m['step_seconds']:.2f}")
            cells += [f"{m[k] / mib:.2f} / {plan[f'dp_{k}_bytes'] / mib:.2f}" for k in ("gather", "reduce")]
            print(f"| {dp} | {strategy} | " + " | ".join(cells) + " |")
    print("each cell: measured on rank 0 / planned (tools/parallel_plan.py); peak: weights and gradients only")


def main(argv=None):
    extra = list(argv if argv is not None else sys.argv[1:])
    if "--strategies" in extra:
        extra.remove("--strategies")
        strategies_table(extra)
        return
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
    _worker() if os.environ.get("MEGALM_BENCH_WORKER") else main()
