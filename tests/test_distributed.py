"""Data parallelism under torchrun (gloo on CPU) is equivalent to one process with the same global batch."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
         "--num-attention-heads", "4", "--seq-length", "32", "--attention-dropout", "0", "--hidden-dropout", "0",
         "--log-interval", "1", "--eval-iters", "0", "--train-iters", "5", "--global-batch-size", "8",
         "--lr", "1e-3", "--seed", "3"]


def losses(output: str) -> list:
    return [float(x) for x in re.findall(r"^iter \d+/\d+ \| tokens \S+ \| loss ([\d.]+)", output, re.M)]


def launch(nproc: int, *flags) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "pretrain_gpt.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "pretrain_gpt.py"]
    out = subprocess.run(cmd + FLAGS + list(flags), cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_reproduce_single_process_loss():
    single = losses(launch(1, "--micro-batch-size", "4"))
    # 2 ranks x micro batch 2 x 2 accumulation steps; tiny buckets so several overlap the backward.
    output = launch(2, "--micro-batch-size", "2", "--ddp-bucket-size", "2000")
    assert "data-parallel 2" in output
    assert "accumulation 2" in output
    double = losses(output)
    assert len(single) == len(double) == 5
    for a, b in zip(single, double):
        assert a == pytest.approx(b, rel=2e-5)
    assert double[-1] < double[0]


def validation_losses(output: str) -> list:
    return [float(x) for x in re.findall(r"^validation at iteration \d+ \| loss ([\d.]+)", output, re.M)]


@pytest.mark.slow
def test_validation_loss_does_not_depend_on_the_data_parallel_size():
    """An evaluation reads --eval-iters global batches, so one process with 4 accumulation steps and
    two ranks with 2 read the same samples (it used to be eval-iters x micro batch x DP samples)."""
    flags = ["--micro-batch-size", "2", "--eval-iters", "2", "--eval-interval", "3"]
    single = validation_losses(launch(1, *flags))
    double = validation_losses(launch(2, *flags))
    assert len(single) == len(double) == 2  # at iteration 3 and after the last
    for a, b in zip(single, double):
        assert a == pytest.approx(b, rel=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
     "--expert-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"],
    ["--pipeline-model-parallel-size", "2"],
])
def test_no_process_group_thread_outlives_the_run(layout):
    """A Gloo worker left running at exit may drop a finished collective's tensors while the
    interpreter shuts down, and abort a run that succeeded (exit -6, seen in 2-rank runs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join("tests", "dist_thread_check.py"), "--micro-batch-size", "2", "--train-iters", "2", *layout]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(re.findall(r"rank \d: (\d+) process-group threads left", out.stdout)) == ["0", "0"], out.stdout
