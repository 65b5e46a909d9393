"""ZeRO-2 / ZeRO-3 and optimizer offload (--data-parallel-sharding-strategy, --optimizer-cpu-offload).

Each launch starts `torchrun` on this file, which then trains several configurations in one process
group (like tests/test_parallel_equivalence.py) and rank 0 writes every run's loss and gradient
norm curves and the model-state memory its rank holds after training (weights, gradients,
optimizer state: distinct storages, `megalm.parallel.data_parallel.storage_bytes`). The
single-process references run in the test process.
"""

import os

import pytest

from tests.helpers import launch_workers, tiny_config, worker_main
from tests.test_moe_model_parallel import MOE
from tests.test_parallel_equivalence import GPT2, LLAMA, assert_same_curves
from tests.test_parallel_equivalence import train as train_curves

ZERO2, ZERO3 = (["--data-parallel-sharding-strategy", s] for s in ("optim_grads", "optim_grads_params"))
SMALL_BUCKETS = ["--ddp-bucket-size", "3000"]
SAVE = ["--train-iters", "5", "--save", "{tmp}/zero3", "--exit-interval", "3"]
LOAD = ["--load", "{tmp}/zero3"]

TWO_RANKS = {  # run in this order: the resumed runs read the checkpoint the saving run writes
    "no_shard": GPT2,
    "optim_grads": GPT2 + ZERO2 + SMALL_BUCKETS,
    "optim_grads_params": GPT2 + ZERO3,
    "optim_grads_params_offload": GPT2 + ZERO3 + ["--optimizer-cpu-offload"],
    "optim_grads_params_bf16_recompute": GPT2 + ZERO3 + ["--bf16", "--recompute-granularity", "full"],
    "optim_grads_params_bf16_recompute_offload": GPT2 + ZERO3 + ["--bf16", "--recompute-granularity", "full",
                                                                 "--optimizer-cpu-offload"],
    "save_zero3": GPT2 + ZERO3 + SAVE,
    "resume_zero3": GPT2 + ZERO3 + LOAD,
    "resume_zero2": GPT2 + ZERO2 + SMALL_BUCKETS + LOAD,
    "resume_zero1": GPT2 + ["--use-distributed-optimizer"] + LOAD,
}
FOUR_RANKS = {
    "dp4_optim_grads_params": GPT2 + ZERO3,
    "tp2_sp_dp2_optim_grads_params_recompute": LLAMA + ZERO3 + [
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "full"],
    # ZeRO-2 inside the pipeline schedule: reduce-scatters after every micro-batch of each stage
    "pp2_dp2_optim_grads": GPT2 + ZERO2 + SMALL_BUCKETS + ["--pipeline-model-parallel-size", "2"],
    # ZeRO-2 / ZeRO-3 at DP 4: the experts' gradients (and ZeRO-3's expert weights) sharded over
    # their expert-data-parallel groups of 2, the rest over all 4 ranks; ZeRO-1 at the same layout
    # is the reference
    # (tests/test_moe_model_parallel.py ties it to one process)
    "dp4_ep2_optim": MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"] + SMALL_BUCKETS,
    "dp4_ep2_optim_grads": MOE + ["--expert-model-parallel-size", "2"] + ZERO2 + SMALL_BUCKETS,
    "dp4_ep2_optim_grads_params": MOE + ["--expert-model-parallel-size", "2"] + ZERO3,
}


def model_state(trainer) -> dict:
    """The model-state bytes this rank holds after training (distinct storages)."""
    from megalm.parallel.data_parallel import storage_bytes
    held = [ddp.state_tensors() for ddp in trainer.ddps]
    return {"memory": {"weights": storage_bytes([t for w, _ in held for t in w]),
                       "gradients": storage_bytes([t for _, g in held for t in g]),
                       "optimizer": storage_bytes(trainer.optimizer.state_tensors())}}


def train(flags: list) -> dict:
    """Train in this process (under torchrun: in the launched process group): per-step curves and
    this rank's model-state bytes after the run."""
    return train_curves(flags, after=model_state)


def launch(nproc: int, runs: dict, tmp_path) -> dict:
    runs = {name: [f.format(tmp=tmp_path) for f in flags] for name, flags in runs.items()}
    return launch_workers(os.path.abspath(__file__), nproc, runs, str(tmp_path / f"zero_{nproc}.json"))


def planned(flags: list, world_size: int) -> dict:
    """tools/parallel_plan.py's memory estimate for `flags` on `world_size` ranks."""
    from megalm.arguments import parse_args
    from tools.parallel_plan import Cluster, estimate
    config, _ = parse_args(flags)
    return estimate(config, Cluster(world_size=world_size), config.data.vocab_size)


@pytest.fixture(scope="module")
def references():
    return {"gpt2": train(GPT2), "llama": train(LLAMA)}


@pytest.mark.slow
def test_zero2_zero3_offload_at_dp2_match_one_process_resume_and_reshard(references, tmp_path):
    curves = launch(2, TWO_RANKS, tmp_path)
    gpt2 = references["gpt2"]
    for name in ("no_shard", "optim_grads", "optim_grads_params", "optim_grads_params_offload"):
        assert_same_curves(gpt2, curves[name], name)
    # Offload changes where the step runs, not what it computes; bf16 and recompute compose.
    for name in ("optim_grads_params_offload", "optim_grads_params_bf16_recompute_offload"):
        plain = curves[name.replace("_offload", "")]
        assert curves[name]["loss"] == pytest.approx(plain["loss"], rel=1e-6), name
    assert curves["optim_grads_params_bf16_recompute"]["loss"] != gpt2["loss"]  # bf16 really ran
    assert curves["optim_grads_params_bf16_recompute"]["loss"] == pytest.approx(gpt2["loss"], rel=1e-2)

    # A ZeRO-3 checkpoint at DP=2 resumes exactly under ZeRO-3, ZeRO-2 and ZeRO-1 at DP=2, and
    # under plain data parallelism and ZeRO-3 in one process: the on-disk state is the same format.
    assert len(curves["save_zero3"]["loss"]) == 3
    for name in ("save_zero3",):
        assert curves[name]["loss"] == pytest.approx(gpt2["loss"][:3], rel=2e-5), name
    resumed = {name: curves[name]["loss"] for name in ("resume_zero3", "resume_zero2", "resume_zero1")}
    load = [f.format(tmp=tmp_path) for f in LOAD]
    resumed["one_process_no_shard"] = train(GPT2 + load)["loss"]
    resumed["one_process_zero3"] = train(GPT2 + ZERO3 + load)["loss"]
    for name, loss in resumed.items():
        assert loss == pytest.approx(gpt2["loss"][3:], rel=2e-5), name

    # Memory per rank after the run: what is sharded is halved, and the planner says so within 10%.
    full, zero2, zero3 = (curves[name]["memory"] for name in ("no_shard", "optim_grads", "optim_grads_params"))
    assert zero2["gradients"] == pytest.approx(full["gradients"] / 2, rel=0.01)
    assert zero2["weights"] == full["weights"]
    assert zero3["weights"] == pytest.approx(full["weights"] / 2, rel=0.01)
    assert zero3["optimizer"] == pytest.approx(full["optimizer"] / 2, rel=0.01)
    # Offload: nothing on the device (the planner's GPU column is 0), 16 bytes per shard parameter
    # on the host (moments, master weights, gradients).
    offload = planned(TWO_RANKS["optim_grads_params_offload"], 2)
    assert offload["optimizer"] == 0
    assert curves["optim_grads_params_offload"]["memory"]["optimizer"] == pytest.approx(offload["host_optimizer"],
                                                                                         rel=0.10)
    for name in ("no_shard", "optim_grads", "optim_grads_params"):
        plan = planned(TWO_RANKS[name], 2)
        for key in ("weights", "gradients", "optimizer"):
            measured = curves[name]["memory"][key]
            assert plan[key] == pytest.approx(measured, rel=0.10), f"{name}: {key}"


@pytest.mark.slow
def test_zero2_zero3_at_dp4_with_tp2_sp_pp2_and_ep2_match_one_process(references, tmp_path):
    curves = launch(4, FOUR_RANKS, tmp_path)
    assert_same_curves(references["gpt2"], curves["dp4_optim_grads_params"], "dp4_optim_grads_params")
    assert_same_curves(references["gpt2"], curves["pp2_dp2_optim_grads"], "pp2_dp2_optim_grads")
    name = "tp2_sp_dp2_optim_grads_params_recompute"
    assert_same_curves(references["llama"], curves[name], name)
    for name in ("dp4_ep2_optim_grads", "dp4_ep2_optim_grads_params"):
        for key in ("loss", "grad_norm"):
            assert curves[name][key] == pytest.approx(curves["dp4_ep2_optim"][key], rel=1e-5), f"{name}: {key}"
    assert curves["dp4_optim_grads_params"]["memory"]["weights"] == pytest.approx(
        planned(FOUR_RANKS["dp4_optim_grads_params"], 4)["weights"], rel=0.10)


@pytest.mark.parametrize("flags, message", [
    (["--use-distributed-optimizer", "--data-parallel-sharding-strategy", "no_shard"],
     "--use-distributed-optimizer shards the optimizer state, --data-parallel-sharding-strategy no_shard"),
    (["--optimizer-cpu-offload"], "--optimizer-cpu-offload moves the distributed optimizer's shard"),
    (ZERO3 + ["--pipeline-model-parallel-size", "2"], "optim_grads_params (ZeRO-3) does not support "
                                                      "--pipeline-model-parallel-size"),
    (ZERO3 + ["--compile"], "optim_grads_params (ZeRO-3) does not support --compile"),
])
def test_contradictory_sharding_flags_are_refused_at_start_up(flags, message):
    from megalm.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config("--train-iters", "1", *flags)


def test_planner_search_shards_more_as_memory_gets_tight(capsys):
    """A 1B model on 8 GPUs: with room to spare plain data parallelism is fastest; in 10 GiB only
    ZeRO-3 keeps DP 8 (the next fastest layout that fits needs TP 2)."""
    from tools.parallel_plan import main
    model = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "32", "--num-query-groups", "8",
             "--swiglu", "--seq-length", "4096", "--bf16", "--micro-batch-size", "1", "--global-batch-size", "256",
             "--vocab-size", "128256", "--world-size", "8", "--search"]
    recommended = "recommended: --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
    assert main(model + ["--gpu-memory-gb", "80"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == recommended + "--data-parallel-sharding-strategy no_shard"
    assert main(model + ["--gpu-memory-gb", "10"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == recommended + "--data-parallel-sharding-strategy optim_grads_params"
    assert main(model + ["--gpu-memory-gb", "10", "--optimizer-cpu-offload"]) == 0
    assert "--optimizer-cpu-offload: the optimizer state" in capsys.readouterr().out


def test_one_process_zero3_gathers_for_eval_and_releases_after():
    """The forward hooks gather a layer for its forward and free it after; between steps only the
    shards hold memory."""
    import torch

    import pretrain_gpt
    from megalm.parallel.data_parallel import DistributedDataParallel
    from megalm.parallel.state import ParallelState
    config = tiny_config(*ZERO3, "--train-iters", "1")
    model = pretrain_gpt.model_provider(config, ParallelState(), 0)
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        expected = model(tokens)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ddp = DistributedDataParallel(model, ParallelState(), sharding="optim_grads_params")
    try:
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(tokens), expected)
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
        with ddp.full_params():
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    finally:
        ddp.close()


def test_one_process_zero3_holds_at_most_three_layers_during_a_step():
    """Forward: the running layer and the prefetched next one; backward: the layer whose output
    gradient arrived, the one before (prefetched), and the one after until its reduction."""
    import torch

    import pretrain_gpt
    from megalm.parallel.data_parallel import DistributedDataParallel
    from megalm.parallel.state import ParallelState
    config = tiny_config(*ZERO3, "--train-iters", "1", "--num-layers", "6")
    model = pretrain_gpt.model_provider(config, ParallelState(), 0)
    ddp = DistributedDataParallel(model, ParallelState(), sharding="optim_grads_params")
    layers = [bucket for _, buckets in ddp.units[1:] for bucket in buckets]
    seen = {"forward": [], "backward": []}

    def count(phase):
        seen[phase].append(sum(b.gathered for b in layers))

    try:
        for layer in model.layers:
            layer.register_forward_pre_hook(lambda *_: count("forward"))
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda _: count("backward"))
        tokens = torch.randint(0, 256, (2, 32))
        for _ in range(2):  # two micro-batches: the layers are gathered again for the second
            ddp(tokens, tokens).backward()
        ddp.finish_grad_sync()
        assert len(layers) == 6 and max(seen["forward"]) == 2 and max(seen["backward"]) <= 3
        assert not any(b.gathered for _, buckets in ddp.units for b in buckets)
    finally:
        ddp.close()


if __name__ == "__main__":
    worker_main(train)
