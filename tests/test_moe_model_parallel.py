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
- Aux-loss-free balancing (expert bias) on DP=2 x EP=2 and TP=2 x EP=2: the token counts behind
  each bias update are summed over the data-parallel ranks, as one process counts them.
- EP=2 combined with model parallelism: TP=2 (with and without sequence parallelism and the
  distributed optimizer), PP=2, and TP=2 x PP=2 x EP=2 on 8 ranks; a TP=2 x EP=2 checkpoint resumes
  on the same curve, merges into the single-process model and splits back bit for bit.
"""

import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megalm import checkpoint as ckpt  # noqa: E402
from megalm.checkpoint import open_checkpoint  # noqa: E402
from megalm.convert.reshard import reshard, saved_layout  # noqa: E402
from tests.test_distributed import launch as launch_script  # noqa: E402
from tests.test_distributed import losses  # noqa: E402
from tests.test_moe_checkpoint import EP2  # noqa: E402
from tests.test_moe_checkpoint import MOE as MOE_CLI_FLAGS  # noqa: E402
from tests.test_parallel_equivalence import LLAMA, LOSS_RTOL, NORM_RTOL, assert_same_curves, launch, train  # noqa: E402

MOE = LLAMA + ["--num-layers", "2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
               "--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate", "--moe-aux-loss-coeff",
               "0.1", "--moe-z-loss-coeff", "0.01"]
MOE_4_LAYERS = MOE + ["--num-layers", "4"]
# aux-loss-free balancing: the per-step token counts are summed over the data-parallel ranks
MOE_BIAS = MOE + ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.05"]
TWO_RANKS = {
    "tp2": MOE + ["--tensor-model-parallel-size", "2"],
    "tp2_sp": MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": MOE + ["--pipeline-model-parallel-size", "2"],
    "pp2_interleaved": MOE_4_LAYERS + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                                       "1"],
    "dp2_ep2_distributed_optimizer": MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
    "dp2_ep2_expert_bias": MOE_BIAS + ["--expert-model-parallel-size", "2"],
    # the backward's recomputed forward exchanges tokens again, and counts them again for the bias
    # (which scales each layer's counts and leaves the update's signs alone)
    "dp2_ep2_expert_bias_recompute_full": MOE_BIAS + ["--expert-model-parallel-size", "2", "--recompute-granularity",
                                                      "full", "--recompute-num-layers", "1"],
}
FOUR_RANKS = {
    # expert-data-parallel groups of 2: the experts' buckets are sharded too
    "dp4_ep2_distributed_optimizer": MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                                            "--ddp-bucket-size", "3000"],
    "tp2_pp2_sp": MOE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                         "--sequence-parallel"],
    # expert parallelism inside each tensor / pipeline rank's data-parallel group
    "tp2_ep2": MOE + ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    "tp2_sp_ep2_distributed_optimizer": MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                               "--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
    "pp2_ep2": MOE + ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    "tp2_ep2_expert_bias": MOE_BIAS + ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
}
EIGHT_RANKS = {
    "tp2_pp2_ep2_sp": MOE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                             "--expert-model-parallel-size", "2", "--sequence-parallel"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process references (2 and 4 layers) and every two-rank layout, in one launch;
    "tp2_saved" stops and saves at iteration 3."""
    tmp = tmp_path_factory.mktemp("moe")
    save = str(tmp / "tp2")
    layouts = dict(TWO_RANKS, tp2_saved=TWO_RANKS["tp2"] + ["--save", save, "--exit-interval", "3"])
    references = {"moe": train(MOE), "moe_4_layers": train(MOE_4_LAYERS), "moe_expert_bias": train(MOE_BIAS)}
    return references, launch(2, layouts, tmp), save


@pytest.mark.slow
def test_moe_two_rank_layouts_match_single_process(runs):
    references, curves, _ = runs
    assert references["moe_expert_bias"]["loss"] != references["moe"]["loss"]  # the bias changes the routing
    for name in TWO_RANKS:
        reference = ("moe_4_layers" if name == "pp2_interleaved" else "moe_expert_bias" if "expert_bias" in name
                     else "moe")
        assert_same_curves(references[reference], curves[name], name)


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory):
    """Every four-rank layout in one launch; "tp2_ep2_saved" stops and saves at iteration 3 and
    "tp2_ep2_resumed" continues from it."""
    tmp = tmp_path_factory.mktemp("moe4")
    save = str(tmp / "tp2_ep2")
    layouts = dict(FOUR_RANKS, tp2_ep2_saved=FOUR_RANKS["tp2_ep2"] + ["--save", save, "--exit-interval", "3"],
                   tp2_ep2_resumed=FOUR_RANKS["tp2_ep2"] + ["--load", save])
    return launch(4, layouts, tmp), save


@pytest.mark.slow
def test_moe_four_rank_layouts_match_single_process(runs, four_rank_runs):
    references, (curves, _) = runs[0], four_rank_runs
    for name in FOUR_RANKS:
        assert_same_curves(references["moe_expert_bias" if "expert_bias" in name else "moe"], curves[name], name)


@pytest.mark.slow
def test_tp2_pp2_ep2_matches_single_process(runs, tmp_path):
    curves = launch(8, EIGHT_RANKS, tmp_path)
    assert_same_curves(runs[0]["moe"], curves["tp2_pp2_ep2_sp"], "tp2_pp2_ep2_sp")


@pytest.mark.slow
def test_tp2_ep2_checkpoint_resumes_and_merges_to_one_process(runs, four_rank_runs, tmp_path):
    """One shard per (tensor, expert-parallel) rank, each with its tensor slice of its own experts;
    the resumed run continues the curve; merged to TP=1, EP=1 it continues the curve in one process
    and splits back into the saved shards bit for bit."""
    reference = runs[0]["moe"]
    (curves, save) = four_rank_runs
    assert curves["tp2_ep2_saved"]["loss"] == curves["tp2_ep2"]["loss"][:3]
    assert curves["tp2_ep2_resumed"]["loss"] == pytest.approx(reference["loss"][3:], rel=LOSS_RTOL)
    assert curves["tp2_ep2_resumed"]["grad_norm"] == pytest.approx(reference["grad_norm"][3:], rel=NORM_RTOL)
    assert saved_layout(save) == (2, 1, 2)
    iteration = ckpt.iteration_dir(save, 3)
    names = [ckpt.shard_dir(t, 0, e) for t in (0, 1) for e in (0, 1)]
    assert sorted(d for d in os.listdir(iteration) if d.startswith("mp_rank")) == sorted(names)
    shards = {name: load_file(os.path.join(iteration, name, "model.safetensors")) for name in names}
    assert shards["mp_rank_01_000_001"]["layers.0.mlp.experts.weight1"].shape == (2, 32, 32)  # [E / EP, 2 ffn / TP, h]
    assert shards["mp_rank_01_000_001"]["layers.0.mlp.experts.weight2"].shape == (2, 32, 16)  # [E / EP, h, ffn / TP]
    single = str(tmp_path / "single")
    reshard(save, single, target_tp=1, target_ep=1, log=lambda *_: None)
    merged = open_checkpoint(single)["model"]
    # expert 3 = expert-parallel rank 1's second expert; its fc2 columns are split over the tensor ranks
    assert torch.equal(merged["layers.1.mlp.experts.weight2"][3],
                       torch.cat([shards[ckpt.shard_dir(t, 0, 1)]["layers.1.mlp.experts.weight2"][1] for t in (0, 1)],
                                 dim=1))
    resumed = train(MOE + ["--load", single])
    assert resumed["loss"] == pytest.approx(reference["loss"][3:], rel=LOSS_RTOL)
    back = str(tmp_path / "tp2_ep2_again")
    reshard(single, back, target_tp=2, target_ep=2, log=lambda *_: None)
    for name, original in shards.items():
        again = load_file(os.path.join(ckpt.iteration_dir(back, 3), name, "model.safetensors"))
        assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again), name


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


def _moe_log(output: str) -> list:
    """(aux, z, load cv) of every log line."""
    return [tuple(map(float, m)) for m in re.findall(r"\| moe aux ([\d.]+) z ([\d.]+) load cv ([\d.]+)", output)]


@pytest.mark.slow
def test_moe_log_covers_every_pipeline_stage():
    """With PP=2 the `moe aux .. z .. load cv ..` part of the log holds every stage's MoE layers: the
    first stage (which logs) has one MoE layer of three, and the numbers match one process's."""
    flags = [*MOE_CLI_FLAGS, "--num-layers", "4", "--first-k-dense-replace", "1"]
    single = _moe_log(launch_script(1, *flags))
    piped = _moe_log(launch_script(2, *flags, "--pipeline-model-parallel-size", "2"))
    assert len(single) == len(piped) == 6
    for a, b in zip(single, piped):
        assert b == pytest.approx(a, rel=1e-3, abs=2e-4)
