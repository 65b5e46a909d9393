"""Model parallelism reproduces the single-process run: same seed, same data, same loss and gradient norm.

Each launch starts `torchrun` on this file, which then acts as a worker: it trains several
configurations one after the other in the same process group and rank 0 writes every step's loss
and global gradient norm (full precision) to a JSON file. The reference runs in the test process.
Tolerance: relative 2e-5 on the loss and 1e-4 on the gradient norm (fp32; the sums run in another
order when split across ranks, nothing else changes).
"""

import os

import pytest

from megalm.arguments import parse_args
from tests.helpers import launch_workers, record_curves, worker_main

BASE = ["--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "32", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--log-interval", "1", "--eval-iters", "0", "--train-iters", "5", "--global-batch-size", "8",
        "--micro-batch-size", "2", "--lr", "1e-3", "--seed", "3"]
GPT2 = BASE  # tied embeddings, learned positions, biases, LayerNorm, GELU
LLAMA = BASE + ["--swiglu", "--num-query-groups", "2", "--position-embedding-type", "rope", "--normalization",
                "RMSNorm", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
DROPOUT = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
LOSS_RTOL, NORM_RTOL = 2e-5, 1e-4

TWO_RANKS = {
    "tp2_fused_ce": LLAMA + ["--tensor-model-parallel-size", "2", "--cross-entropy-fusion", "fused"],
    "tp2_sp": GPT2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": GPT2 + ["--pipeline-model-parallel-size", "2"],
    "pp2_interleaved": LLAMA + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "dp2_distributed_optimizer": GPT2 + ["--use-distributed-optimizer", "--ddp-bucket-size", "3000"],
    "tp2_sp_dropout": GPT2 + DROPOUT + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "tp2_sp_dropout_recompute_full": GPT2 + DROPOUT + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                       "--recompute-granularity", "full", "--recompute-num-layers", "2"],
    "tp2_sp_dropout_recompute_selective": GPT2 + DROPOUT + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                            "--recompute-granularity", "selective"],
}
EIGHT_RANKS = {
    "tp2_pp2_dp2_sp_distributed_optimizer": GPT2 + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                                                    "2", "--sequence-parallel", "--use-distributed-optimizer"],
    "tp2_pp2_interleaved_dp2": LLAMA + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                        "--num-layers-per-virtual-pipeline-stage", "1"],
}


def train(flags: list, after=None) -> dict:
    """Train in this process (under torchrun: in the launched process group); per-step curves."""
    import pretrain_gpt
    config, _ = parse_args(flags)
    pretrain_gpt.set_vocabulary(config)
    return record_curves(config, pretrain_gpt.model_provider, after=after)


def launch(nproc: int, runs: dict, tmp_path) -> dict:
    return launch_workers(os.path.abspath(__file__), nproc, runs, str(tmp_path / f"curves_{nproc}.json"))


def assert_same_curves(reference: dict, curves: dict, name: str) -> None:
    assert len(curves["loss"]) == len(reference["loss"]) == 5, name
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", NORM_RTOL)):
        for step, (a, b) in enumerate(zip(reference[key], curves[key])):
            assert b == pytest.approx(a, rel=rtol), f"{name}: {key} at step {step + 1}: {b} vs {a}"


@pytest.fixture(scope="module")
def references():
    return {"gpt2": train(GPT2), "llama": train(LLAMA)}


@pytest.mark.slow
def test_two_rank_layouts_match_single_process(references, tmp_path):
    """TP=2 (with the vocab-parallel fused linear + cross-entropy), TP=2 with sequence parallelism,
    PP=2 (1F1B, tied embeddings across stages), PP=2 interleaved, DP=2 with the distributed optimizer;
    and with dropout on, full / selective recompute under TP + SP change nothing."""
    curves = launch(2, TWO_RANKS, tmp_path)
    for name in ("tp2_fused_ce", "tp2_sp", "pp2", "pp2_interleaved", "dp2_distributed_optimizer"):
        assert_same_curves(references["llama" if "--swiglu" in TWO_RANKS[name] else "gpt2"], curves[name], name)
    dropout = curves["tp2_sp_dropout"]
    assert dropout["loss"] != curves["tp2_sp"]["loss"]  # the masks are really drawn
    for name in ("tp2_sp_dropout_recompute_full", "tp2_sp_dropout_recompute_selective"):
        for key in ("loss", "grad_norm"):
            assert curves[name][key] == pytest.approx(dropout[key], rel=1e-6), f"{name}: {key}"


@pytest.mark.slow
def test_tp2_pp2_dp2_matches_single_process(references, tmp_path):
    curves = launch(8, EIGHT_RANKS, tmp_path)
    assert_same_curves(references["gpt2"], curves["tp2_pp2_dp2_sp_distributed_optimizer"], "tp2_pp2_dp2")
    assert_same_curves(references["llama"], curves["tp2_pp2_interleaved_dp2"], "tp2_pp2_interleaved_dp2")


if __name__ == "__main__":
    worker_main(train)
