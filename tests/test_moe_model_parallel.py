"""MoE under model parallelism reproduces the single-process MoE run: same loss and gradient norm
at every step (the launch, the worker and the tolerances are those of tests/test_parallel_equivalence.py).

Every run has gated shared experts and aux / z losses (coefficients large enough to move the
gradient norm), which must reach the routers of every pipeline stage.

- TP=2: every expert split like the dense MLP, the router replicated; with and without sequence
  parallelism; its checkpoint resharded to TP=1 continues the curve in one process and splits back
  bit for bit.
- PP=2 (1F1B and interleaved) and TP=2 x PP=2 with sequence parallelism: the aux losses of the
  first stage reach its routers through `AuxLossAutoScaler` and join the logged loss.
- EP=2 with the distributed optimizer on DP=2 and DP=4 (the experts' buckets sharded over the
  expert-data-parallel group); a DP=4 checkpoint resumes on the same curve.
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megalm.convert.megalm_checkpoint import open_checkpoint  # noqa: E402
from megalm.convert.reshard import reshard, saved_layout  # noqa: E402
from megalm.training import checkpoint as ckpt  # noqa: E402
from tests.test_distributed import launch as launch_script  # noqa: E402
from tests.test_distributed import losses  # noqa: E402
from tests.test_moe_checkpoint import EP2  # noqa: E402
from tests.test_parallel_equivalence import LLAMA, LOSS_RTOL, assert_same_curves, launch, train  # noqa: E402

MOE = LLAMA + ["--num-layers", "2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
               "--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate", "--moe-aux-loss-coeff",
               "0.1", "--moe-z-loss-coeff", "0.01"]
MOE_4_LAYERS = MOE + ["--num-layers", "4"]
TWO_RANKS = {
    "tp2": MOE + ["--tensor-model-parallel-size", "2"],
    "tp2_sp": MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": MOE + ["--pipeline-model-parallel-size", "2"],
    "pp2_interleaved": MOE_4_LAYERS + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                                       "1"],
    "dp2_ep2_distributed_optimizer": MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
}
FOUR_RANKS = {
    # expert-data-parallel groups of 2: the experts' buckets are sharded too
    "dp4_ep2_distributed_optimizer": MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                                            "--ddp-bucket-size", "3000"],
    "tp2_pp2_sp": MOE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                         "--sequence-parallel"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process references (2 and 4 layers) and every two-rank layout, in one launch;
    "tp2_saved" stops and saves at iteration 3."""
    tmp = tmp_path_factory.mktemp("moe")
    save = str(tmp / "tp2")
    layouts = dict(TWO_RANKS, tp2_saved=TWO_RANKS["tp2"] + ["--save", save, "--exit-interval", "3"])
    references = {"moe": train(MOE), "moe_4_layers": train(MOE_4_LAYERS)}
    return references, launch(2, layouts, tmp), save


@pytest.mark.slow
def test_moe_two_rank_layouts_match_single_process(runs):
    references, curves, _ = runs
    for name in TWO_RANKS:
        assert_same_curves(references["moe_4_layers" if name == "pp2_interleaved" else "moe"], curves[name], name)


@pytest.mark.slow
def test_moe_four_rank_layouts_match_single_process(runs, tmp_path):
    references, _, _ = runs
    curves = launch(4, FOUR_RANKS, tmp_path)
    for name in FOUR_RANKS:
        assert_same_curves(references["moe"], curves[name], name)


@pytest.mark.slow
def test_tp2_moe_checkpoint_merged_to_tp1_continues_the_curve(runs, tmp_path):
    """The experts' fc1 shards ([gate_r; up_r] per rank) and fc2 shards merge into the single-process
    experts: the merged checkpoint continues the reference curve in one process, and splits back
    into the saved shards bit for bit."""
    reference, save = runs[0]["moe"], runs[2]
    shards = {rank: load_file(os.path.join(ckpt.iteration_dir(save, 3), f"mp_rank_0{rank}_000", "model.safetensors"))
              for rank in (0, 1)}
    assert shards[0]["layers.0.mlp.experts.weight1"].shape == (4, 32, 32)  # [E, 2 ffn / TP, h]
    assert shards[0]["layers.0.mlp.experts.weight2"].shape == (4, 32, 16)  # [E, h, ffn / TP]
    single = str(tmp_path / "tp1")
    reshard(save, single, target_tp=1, log=lambda *_: None)
    assert saved_layout(single) == (1, 1, 1)
    merged = open_checkpoint(single)["model"]
    gate, up = (torch.cat([shards[r]["layers.1.mlp.experts.weight1"].chunk(2, dim=1)[j] for r in (0, 1)], dim=1)
                for j in (0, 1))
    assert torch.equal(merged["layers.1.mlp.experts.weight1"], torch.cat([gate, up], dim=1))
    resumed = train(MOE + ["--load", single])["loss"]
    assert resumed == pytest.approx(reference["loss"][3:], rel=LOSS_RTOL)
    back = str(tmp_path / "tp2_again")
    reshard(single, back, target_tp=2, log=lambda *_: None)
    for rank, original in shards.items():
        again = load_file(os.path.join(ckpt.iteration_dir(back, 3), f"mp_rank_0{rank}_000", "model.safetensors"))
        assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)


@pytest.mark.slow
def test_ep2_distributed_optimizer_checkpoint_resumes_the_same_loss_curve(tmp_path):
    """DP=4, EP=2: the experts' optimizer state, sharded over expert-data-parallel groups of 2, is
    gathered into the checkpoint and sharded again on resume."""
    flags = [*EP2, "--micro-batch-size", "1", "--use-distributed-optimizer"]
    save = str(tmp_path / "ep2")
    full = launch_script(4, *flags)
    first = launch_script(4, *flags, "--save", save, "--exit-interval", "3")
    resumed = launch_script(4, *flags, "--load", save)
    assert "resumed from" in resumed
    assert losses(first) + losses(resumed) == losses(full) and len(losses(full)) == 6
