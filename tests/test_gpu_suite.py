"""tools/bench/gpu_suite.py on a machine without a GPU: --dry-run lists the plan, a real run refuses."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tools" / "bench" / "gpu_suite.py"


def _suite(*args):
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_dry_run_lists_every_benchmark_with_its_estimate():
    proc = _suite("--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines[:-1]]
    assert names == ["cuda-extension", "gpu-tests", "rmsnorm", "attention", "linear-ce", "moe", "train-gpt2",
                     "train-llama", "generation", "fp8"]
    total = sum(int(line.split()[1].strip("~s")) for line in lines[:-1])
    assert lines[-1].split()[:2] == ["total", f"~{total}s"]
    assert "budget 550 s: fits" in lines[-1]


def test_dry_run_says_when_the_plan_exceeds_the_budget():
    proc = _suite("--dry-run", "--budget-s", "60", "--only", "attention,moe")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["attention", "moe", "total"]
    assert "budget 60 s: does not fit; the last steps will be skipped" in proc.stdout


def test_unknown_step_is_an_error():
    proc = _suite("--dry-run", "--only", "attention,warp-drive")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --only: unknown step warp-drive; choose from cuda-extension")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_exits_at_once_with_a_message(tmp_path):
    proc = _suite("--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: tools/bench/gpu_suite.py needs a CUDA GPU and none is visible")
    assert "--dry-run" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def _module():
    sys.path.insert(0, str(SUITE.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SUITE.parent))
    return gpu_suite


def test_markdown_marks_each_target_pass_or_short():
    gpu_suite = _module()
    R = gpu_suite.Result
    results = [R("attention", "fwd vs SDPA flash", 1.62, target=1.5), R("rmsnorm", "forward", 2500.0, "GB/s", 2800),
               R("linear+ce", "peak memory", 0.1, target=0.125, at_most=True), R("generation", "batch 1", 1.1),
               R("moe", "no number", float("nan"), target=4.0)]
    env = {"device": "H100", "torch": "2.13", "cuda": "12.8", "triton": "3.9.0", "commit": "abc1234",
           "date": "2026-12-01 18:00 UTC"}
    text = gpu_suite.markdown(env, results, [{"step": "train-llama", "status": "skipped: needs ~55 s, 3 s left"}],
                              "python tools/bench/gpu_suite.py")
    assert "| attention | fwd vs SDPA flash | 1.62x | >= 1.5x | pass |" in text
    assert "| rmsnorm | forward | 2,500.0 GB/s | >= 2800 GB/s | short |" in text
    assert "| linear+ce | peak memory | 0.10x | <= 0.125x | pass |" in text
    assert "| generation | batch 1 | 1.10x | - | - |" in text
    assert "| train-llama | skipped: needs ~55 s, 3 s left |" in text
    assert results[-1].row()["value"] is None and results[-1].verdict == "-"


def test_budget_skips_steps_that_do_not_fit_and_stops_a_running_one():
    gpu_suite = _module()
    import time

    def slow(args):
        time.sleep(5)
        return [gpu_suite.Result("slow", "never", 1.0)]

    def quick(args):
        return [gpu_suite.Result("quick", "ratio", 2.0, target=1.5), gpu_suite.Result("quick", "mem", 0.2,
                                                                                     target=0.125, at_most=True)]
    steps = [gpu_suite.Step("quick", 1, quick, ""), gpu_suite.Step("slow", 1, slow, ""),
             gpu_suite.Step("big", 100, quick, "")]
    results, log = gpu_suite.run_steps(steps, gpu_suite.parse_args(["--budget-s", "2"]))
    assert [r.verdict for r in results] == ["pass", "short"]
    assert log[0]["status"] == "ok"
    assert log[1]["status"] == "stopped: the time budget ran out"
    assert log[2]["status"].startswith("skipped: needs ~100 s")
