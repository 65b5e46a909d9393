"""RoPE and SwiGLU fast paths against the PyTorch reference, forward and backward."""

import os

import pytest
import torch

import megalm.kernels as K

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rope_tables(s, d, offset=0):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(offset, offset + s, dtype=torch.float32), inv_freq)  # [s, d/2]
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _rope_run(backend, qkv, n_q, n_kv, cos, sin, grads):
    """Rotate q / k sliced out of a fused [b, s, n_q + 2 n_kv, d] projection (strided views)."""
    qkv = qkv.detach().clone().requires_grad_()
    q, k = qkv[:, :, :n_q], qkv[:, :, n_q:n_q + n_kv]
    q_out, k_out = K.apply_rotary(q, k, cos, sin, backend=backend)
    torch.autograd.backward((q_out, k_out), grads)
    return q_out.detach(), k_out.detach(), qkv.grad


@pytest.mark.parametrize("b,s,n_q,n_kv,d,offset", [(2, 7, 4, 2, 16, 0), (1, 5, 3, 1, 24, 11)])
def test_rope_triton_matches_reference_on_strided_views(b, s, n_q, n_kv, d, offset):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, n_q + 2 * n_kv, d, generator=g).to(DEVICE)
    cos, sin = _rope_tables(s, d, offset)
    grads = (torch.randn(b, s, n_q, d, generator=g).to(DEVICE), torch.randn(b, s, n_kv, d, generator=g).to(DEVICE))
    got = _rope_run("triton", qkv, n_q, n_kv, cos, sin, grads)
    want = _rope_run("reference", qkv, n_q, n_kv, cos, sin, grads)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_rope_reference_is_rotate_half():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # x1 = (1, 0), x2 = (0, 0): rotating by 90 degrees moves it to x2's first slot
    cos, sin = torch.zeros(1, 2), torch.ones(1, 2)
    q_out, _ = K.apply_rotary(x, x, cos, sin, backend="reference")
    torch.testing.assert_close(q_out, torch.tensor([[[[0.0, 0.0, 1.0, 0.0]]]]))


def test_rope_fp16_output_dtype_and_accuracy():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 4, 32, generator=g).to(DEVICE, torch.float16)
    k = torch.randn(2, 6, 2, 32, generator=g).to(DEVICE, torch.float16)
    cos, sin = _rope_tables(6, 32)
    q_out, k_out = K.apply_rotary(q, k, cos, sin, backend="triton")
    q_ref, k_ref = K.apply_rotary(q, k, cos, sin, backend="reference")
    assert q_out.dtype == torch.float16
    torch.testing.assert_close(q_out, q_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(k_out, k_ref, atol=1e-3, rtol=1e-3)


def _swiglu_run(backend, x, grad):
    x = x.detach().clone().requires_grad_()
    y = K.swiglu(x, backend=backend)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("shape,dtype,tol", [((3, 5, 2 * 67), torch.float32, 1e-5), ((4, 2 * 300), torch.float16, 1e-3)])
def test_swiglu_triton_matches_reference(shape, dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(DEVICE, dtype)
    got = _swiglu_run("triton", x, grad)
    want = _swiglu_run("reference", x, grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)


def test_swiglu_gate_half_first():
    x = torch.tensor([[1.0, 2.0]])  # gate 1, up 2
    torch.testing.assert_close(K.swiglu(x, backend="reference"), torch.nn.functional.silu(torch.tensor([[1.0]])) * 2)


@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_full_size():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 2048, 32 + 2 * 8, 128, generator=g).to(DEVICE, torch.bfloat16)
    cos, sin = _rope_tables(2048, 128)
    grads = (torch.randn(4, 2048, 32, 128, device=DEVICE, dtype=torch.bfloat16),
             torch.randn(4, 2048, 8, 128, device=DEVICE, dtype=torch.bfloat16))
    for a, e in zip(_rope_run("triton", qkv, 32, 8, cos, sin, grads), _rope_run("reference", qkv, 32, 8, cos, sin, grads)):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
    x = torch.randn(8192, 2 * 5504, device=DEVICE, dtype=torch.bfloat16)
    grad = torch.randn(8192, 5504, device=DEVICE, dtype=torch.bfloat16)
    for a, e in zip(_swiglu_run("triton", x, grad), _swiglu_run("reference", x, grad)):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
