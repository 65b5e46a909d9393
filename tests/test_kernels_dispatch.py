"""Dispatch rules of megalm.kernels: CPU default, MEGALM_KERNELS, fallbacks and their warnings."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import megalm.kernels as K
from megalm.kernels import dispatch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reset_warnings()


def test_import_does_not_load_triton():
    code = "import sys, megalm.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def _cpu_choice(**kwargs):
    return dispatch.select("op", kwargs.pop("backend", "auto"), torch.device("cpu"), ("triton",),
                           lambda name: None)


def test_cpu_default_is_reference():
    assert _cpu_choice() == "reference"


def test_env_forces_a_path(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert _cpu_choice() == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # op without a CUDA kernel: Triton
    assert _cpu_choice() == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert _cpu_choice() == "reference"
    assert _cpu_choice(backend="triton") == "triton"  # an explicit argument wins over the environment
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MEGALM_KERNELS"):
        _cpu_choice()


def test_unknown_backend_argument_raises():
    with pytest.raises(ValueError, match="backend"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8), backend="fastest")


def test_auto_falls_back_to_reference_with_one_warning():
    def unsupported(name):
        return "head dim 1000 too large"
    with pytest.warns(RuntimeWarning, match="head dim 1000 too large"):
        assert dispatch.select("op", "auto", torch.device("cuda"), ("triton",), unsupported) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("op", "auto", torch.device("cuda"), ("triton",), unsupported) == "reference"


def test_forced_triton_on_unsupported_input_raises_clearly(monkeypatch):
    x = torch.randn(4, 7)  # odd last dim: SwiGLU needs two halves
    with pytest.raises(K.KernelUnsupportedError, match="last dim must be even"):
        K.swiglu(x, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(K.KernelUnsupportedError, match="MEGALM_KERNELS=triton"):
        K.swiglu(x)


def test_forced_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(K.KernelUnsupportedError, match="needs CUDA tensors"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8), backend="triton")


def _bf16_calls():
    """One call per op's Triton path, all in bfloat16 on CPU."""
    bf16 = dict(dtype=torch.bfloat16)
    x, w = torch.randn(4, 8, **bf16), torch.ones(8, **bf16)
    q, cos = torch.randn(1, 4, 2, 8, **bf16), torch.ones(4, 4)
    labels = torch.zeros(4, dtype=torch.int64)
    routing = K.expert_rows(torch.tensor([[0], [1], [0], [1]]), 2)
    return {
        "attention": lambda: K.attention(q, q, q, backend="triton"),
        "rms_norm": lambda: K.rms_norm(x, w, backend="triton"),
        "layer_norm": lambda: K.layer_norm(x, w, w, backend="triton"),
        "cross_entropy": lambda: K.cross_entropy(x, labels, backend="triton"),
        "linear_cross_entropy": lambda: K.linear_cross_entropy(x, torch.ones(16, 8, **bf16), labels,
                                                               backend="triton"),
        "apply_rotary": lambda: K.apply_rotary(q, q, cos, cos, backend="triton"),
        "swiglu": lambda: K.swiglu(x, backend="triton"),
        "grouped_gemm": lambda: K.grouped_gemm(x, torch.ones(2, 8, 8, **bf16), torch.tensor([2, 2]),
                                               backend="triton"),
        "permute": lambda: K.permute(x, routing, backend="triton"),
        "topk_router": lambda: K.topk_router(x, 2, backend="triton"),
    }


@pytest.mark.parametrize("op", sorted(_bf16_calls()))
def test_every_triton_path_refuses_bfloat16_on_the_interpreter(monkeypatch, op):
    if not dispatch.triton_importable():
        pytest.skip("the rule is checked after 'triton is not installed'")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(K.KernelUnsupportedError, match="the Triton interpreter has no bfloat16"):
        _bf16_calls()[op]()


def test_forced_cuda_without_extension_raises():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have the extension")
    with pytest.raises(K.KernelUnsupportedError, match="CUDA"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8), backend="cuda")


def test_layer_norm_has_no_cuda_kernel():
    with pytest.raises(K.KernelUnsupportedError, match="no CUDA LayerNorm"):
        K.layer_norm(torch.randn(2, 8), torch.ones(8), None, backend="cuda")


def test_attention_dropout_with_forced_triton(monkeypatch):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(K.KernelUnsupportedError, match="dropout"):
        K.attention(q, q, q, dropout_p=0.1, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.warns(RuntimeWarning, match="dropout"):
        assert K.attention(q, q, q, dropout_p=0.1).shape == q.shape


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        K.attention(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match="s_q <= s_k"):
        K.attention(torch.randn(1, 5, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))


def test_describe_names_every_op():
    from megalm.config import ModelConfig
    config = ModelConfig(normalization="RMSNorm", swiglu=True, position_embedding_type="rope")
    info = K.describe("cpu", config)
    assert info == {"attention": "sdpa", "rms_norm": "reference", "cross_entropy": "unfused cross_entropy: reference",
                    "apply_rotary": "reference", "swiglu": "reference"}
    assert K.describe("cuda", config)["rms_norm"] in ("triton", "reference (triton is not installed)")
