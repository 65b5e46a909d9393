"""Expert-parallel checkpoints (gloo on CPU, torchrun): an EP=2 run saves one shard per
expert-parallel rank and resumes on the same loss curve (2 ranks; 4 ranks with dropout), merges
into the full model (resharding to EP=1 continues the curve in one process), and a run of another
expert-parallel size is refused with the command that reshards."""

import io
import os
import sys
from contextlib import redirect_stderr

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megalm import checkpoint as ckpt  # noqa: E402
from megalm.checkpoint import open_checkpoint  # noqa: E402
from megalm.checkpoint.files import write_text_atomic  # noqa: E402
from megalm.convert.reshard import reshard, saved_layout  # noqa: E402
from tests.test_distributed import FLAGS, launch, losses  # noqa: E402
from tests.test_parallel_equivalence import launch as launch_recorded  # noqa: E402
from tests.test_parallel_equivalence import train  # noqa: E402

# 2 ranks x micro-batch 2 x accumulation 2: the single process (micro-batch 2, accumulation 4)
# sees the same micro-batches, so the aux loss (taken per micro-batch) is the same too.
MOE = ["--micro-batch-size", "2", "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2",
       "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32", "--moe-aux-loss-coeff", "0.01",
       "--moe-z-loss-coeff", "0.001", "--train-iters", "6"]
EP2 = MOE + ["--expert-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory):
    """The uninterrupted EP=2 run (every loss in full precision); the same run under pretrain_gpt.py
    stopped and saved at iteration 3, then resumed."""
    tmp = tmp_path_factory.mktemp("ckpt")
    save = str(tmp / "ep2")
    full = launch_recorded(2, {"ep2": FLAGS + EP2}, tmp)["ep2"]["loss"]
    first = launch(2, *EP2, "--save", save, "--exit-interval", "3")
    resumed = launch(2, *EP2, "--load", save)
    return save, full, first, resumed


@pytest.mark.slow
def test_ep2_checkpoint_resumes_the_same_loss_curve(ep2_runs):
    save, full, first, resumed = ep2_runs
    assert "resumed from" in resumed and "RNG not restored" not in resumed
    assert len(full) == 6
    assert losses(first) + losses(resumed) == [float(f"{loss:.4f}") for loss in full]  # as printed
    meta = ckpt.find_checkpoint(save)["metadata"]
    assert meta["layout"]["expert_model_parallel_size"] == 2 and meta["layout"]["sharded"]
    shards = sorted(n for n in os.listdir(ckpt.iteration_dir(save, 3)) if n.startswith("mp_rank_"))
    assert shards == ["mp_rank_00_000_000", "mp_rank_00_000_001"]
    assert {"mp_rank_00_000_001/model.safetensors", "mp_rank_00_000_001/optimizer.pt"} <= set(meta["files"])
    # Each rank's shard holds its two experts and the replicated weights, identical on both.
    a, b = (load_file(os.path.join(ckpt.iteration_dir(save, 3), s, "model.safetensors")) for s in shards)
    assert a["layers.0.mlp.experts.weight1"].shape[0] == 2
    assert not torch.equal(a["layers.0.mlp.experts.weight1"], b["layers.0.mlp.experts.weight1"])
    assert torch.equal(a["layers.0.mlp.router.weight"], b["layers.0.mlp.router.weight"])


@pytest.mark.slow
def test_ep2_checkpoint_merged_to_ep1_continues_the_curve_in_one_process(ep2_runs, tmp_path):
    save, full, _, _ = ep2_runs
    merged = open_checkpoint(save)["model"]
    shards = [load_file(os.path.join(ckpt.iteration_dir(save, 3), s, "model.safetensors"))
              for s in ("mp_rank_00_000_000", "mp_rank_00_000_001")]
    # Global expert order is expert-parallel rank major: rank 0's experts first.
    assert torch.equal(merged["layers.1.mlp.experts.weight2"],
                       torch.cat([s["layers.1.mlp.experts.weight2"] for s in shards]))
    single = str(tmp_path / "ep1")
    reshard(save, single, target_ep=1, log=lambda *_: None)
    assert saved_layout(single) == (1, 1, 1)
    resumed = train(FLAGS + MOE + ["--load", single])["loss"]
    assert resumed == pytest.approx(full[3:], rel=1e-5)
    back = str(tmp_path / "ep2_again")
    reshard(single, back, target_ep=2, log=lambda *_: None)
    for shard, original in zip(("mp_rank_00_000_000", "mp_rank_00_000_001"), shards):
        again = load_file(os.path.join(ckpt.iteration_dir(back, 3), shard, "model.safetensors"))
        assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)


@pytest.mark.slow
def test_ep2_dp4_checkpoint_is_written_once_per_expert_shard_and_resumes_with_dropout(tmp_path):
    """4 ranks: two expert-parallel groups; ranks 0 and 1 (the first of each expert-data-parallel
    group) write the two shards. Dropout on: the per-rank RNG states must come back too."""
    save = str(tmp_path / "ep2_dp4")
    flags = [*EP2, "--micro-batch-size", "1", "--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
    full = launch(4, *flags, "--save", save, "--save-interval", "3")
    write_text_atomic(os.path.join(save, ckpt.TRACKER), "3")  # resume from the middle of the run
    resumed = launch(4, *flags, "--load", save)
    assert "resumed from" in resumed and len(losses(full)) == 6
    assert losses(resumed) == losses(full)[3:]
    names = sorted(os.listdir(ckpt.iteration_dir(save, 3)))
    assert names == ["metadata.json", "mp_rank_00_000_000", "mp_rank_00_000_001", "rng"]
    assert len(os.listdir(os.path.join(ckpt.iteration_dir(save, 3), "rng"))) == 4


@pytest.mark.slow
def test_loading_an_ep2_checkpoint_with_ep1_says_how_to_reshard(ep2_runs):
    import pretrain_gpt
    save = ep2_runs[0]
    err = io.StringIO()
    with redirect_stderr(err):
        code = pretrain_gpt.main(FLAGS + MOE + ["--load", save])
    assert code == 2
    message = err.getvalue()
    assert "saved with TP=1, PP=1, EP=2; this run uses TP=1, PP=1, EP=1" in message
    assert "--target-expert-model-parallel-size 1" in message
