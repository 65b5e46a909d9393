"""Every Triton kernel compiles for sm_90 and sm_80 with its GPU configs, on a machine without a GPU.

The other kernel tests run through Triton's interpreter (small blocks, no bfloat16); these compile
what a GPU would run, through each kernel's real launch function and its autotuner configs, with
the compile-only driver of `megalm.kernels._triton.compile_check` (one process per architecture,
both at once, once per module). Each config either fits the architecture's shared memory or is
pruned before it compiles, with the reason; registers and spills are printed.

The attention shapes are spread over the two architectures to keep this to a few minutes;
MEGALM_COMPILE_CHECK=full compiles every shape and dtype on both (about three times as long).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalm.kernels._triton import compile_check
from megalm.kernels._triton.configs import SHARED_MEMORY_BYTES, pipelined_bytes, shared_memory_limit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("MEGALM_COMPILE_CHECK", "") == "full"
PAIRS = [(arch, case) for arch in compile_check.ARCHS for case in compile_check.cases_for(arch, FULL)]


def _compiler_missing():
    import triton
    try:
        from triton.backends import backends
        ptxas = triton.knobs.nvidia.ptxas.path if "nvidia" in backends else None
    except (ImportError, AttributeError, RuntimeError):
        ptxas = None
    return None if ptxas else "Triton's CUDA backend (with its ptxas) is not installed"


def _compile_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said out loud (3.9 warns otherwise)
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    reason = _compiler_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile")
    procs = {arch: subprocess.Popen(
        [sys.executable, "-m", "megalm.kernels._triton.compile_check", "--arch", str(arch),
         "--json", str(out / f"sm_{arch}.json")] + (["--full"] if FULL else []), cwd=ROOT, env=_compile_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for arch in compile_check.ARCHS}
    logs = {arch: proc.communicate(timeout=1800)[0] for arch, proc in procs.items()}
    result = {}
    for arch in compile_check.ARCHS:
        path = out / f"sm_{arch}.json"
        assert path.exists(), f"sm_{arch}: the compile check wrote no report:\n{logs[arch][-4000:]}"
        result[arch] = json.loads(path.read_text())
    return result


@pytest.mark.parametrize("arch, case", PAIRS, ids=[f"sm_{arch}-{case.name}" for arch, case in PAIRS])
def test_kernel_compiles_for_gpu(reports, arch, case):
    report = reports[arch]
    (entry,) = [c for c in report["cases"] if c["case"] == case.name]
    assert entry["error"] is None, f"{case.name} on sm_{arch}: {entry['error']}"
    launched = [k["kernel"] for k in report["launched"] if k["case"] == case.name]
    assert launched, f"{case.name} on sm_{arch} launched no kernel"


@pytest.mark.parametrize("arch", compile_check.ARCHS, ids=lambda a: f"sm_{a}")
def test_compiled_configs_fit_shared_memory(reports, arch):
    """Every autotuner prunes, before compiling, the configs over the architecture's shared memory
    (`configs.shared_memory_prune`); so no compiled config is over it."""
    report = reports[arch]
    assert not report["unpruned_autotuners"], f"autotuners without an early prune: {report['unpruned_autotuners']}"
    over = [c for c in report["compiled"] if not c["fits"]]
    assert not over, "compiled past the shared-memory limit: " + "; ".join(
        f"{c['kernel']} {c['constexprs']} w{c['num_warps']} s{c['num_stages']}: {c['shared']} > {c['limit']} bytes"
        for c in over)


def test_autotuners_prune_per_architecture(reports):
    """The grouped GEMM's 192 KB tile fits sm_90 and is pruned on sm_80, with the reason."""
    pruned = {arch: [p for p in reports[arch]["pruned"] if p["kernel"] == "grouped_gemm"] for arch in reports}
    assert not pruned[90]
    assert pruned[80] and all("sm_80 allows 163 KB per block" in p["reason"] for p in pruned[80])
    assert any(c["kernel"] == "_grouped_gemm_kernel" and c["constexprs"]["BLOCK_K"] == 128
               for c in reports[90]["compiled"])


def test_resource_report(reports, capsys):
    """Print shared memory, registers and spills of every compiled kernel (CI's log keeps them)."""
    text = "\n".join(compile_check.format_report(reports[arch]) for arch in compile_check.ARCHS)
    with capsys.disabled():
        print("\n" + text)
    loaded = [c for arch in reports for c in reports[arch]["compiled"] if c["fits"]]  # the others never load
    assert loaded and all(c["n_regs"] > 0 and c["n_spills"] >= 0 for c in loaded), "cuobjdump gave no register counts"


def test_oversized_config_is_pruned_with_its_reason(caplog):
    import triton
    from triton.runtime.driver import driver

    from megalm.kernels._triton import grouped_gemm
    oversized = triton.Config({"BLOCK_N": 256, "BLOCK_K": 256}, num_warps=8, num_stages=4)
    prune = grouped_gemm._grouped_gemm_tuned.early_config_prune
    previous = getattr(driver, "_active", None)
    driver.set_active(compile_check.CompileOnlyDriver(90))
    try:
        with caplog.at_level("DEBUG", logger="megalm.kernels"):
            kept = prune(grouped_gemm.FORWARD_CONFIGS + [oversized], {"X": torch.empty(1, dtype=torch.bfloat16)},
                         BLOCK_M=grouped_gemm.FORWARD_BLOCK_M)
    finally:
        driver.set_active(previous)
    assert oversized not in kept and kept == grouped_gemm.FORWARD_CONFIGS
    need = pipelined_bytes([(128, 256), (256, 256)], [], 4, 2)
    assert [r.pruned for r in caplog.records if hasattr(r, "pruned")] == [
        ("grouped_gemm", str(oversized),
         f"needs ~{need // 1024} KB of shared memory, sm_90 allows 227 KB per block")]


def test_shared_memory_limits():
    assert shared_memory_limit(90) == 227 * 1024 and shared_memory_limit(80) == 163 * 1024
    assert shared_memory_limit(91) == SHARED_MEMORY_BYTES[90]  # an unknown minor version: the one below


def test_compile_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "megalm.kernels._triton.compile_check", "--only", "norm"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: compile_check: TRITON_INTERPRET is set" in proc.stderr
    assert "unset it" in proc.stderr


@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm80_and_sm90():
    proc = subprocess.run(["bash", "tools/check_cuda_sources.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch in ("sm_80", "sm_90"):
        for source in ("rmsnorm_kernels.cu", "moe_permute_kernels.cu"):
            assert f"ok    csrc/cuda/{source} (nvcc, {arch})" in proc.stdout
