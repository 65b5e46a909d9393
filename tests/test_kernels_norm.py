"""RMSNorm / LayerNorm fast paths against the PyTorch reference, forward and backward."""

import os

import pytest
import torch

import megalm.kernels as K
from megalm.kernels.rmsnorm import layer_norm_reference, rms_norm_reference

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _forward_backward(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def _norm_case(shape, dtype, weight_dtype=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, weight_dtype or dtype)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, weight_dtype or dtype) if bias else None
    grad = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, w, b, grad


def _ops(kind, backend):
    if kind == "rms":
        return lambda x, w: K.rms_norm(x, w, 1e-5, backend=backend)
    return lambda x, w, b=None: K.layer_norm(x, w, b, 1e-5, backend=backend)


@pytest.mark.parametrize("kind,shape,bias", [("rms", (3, 5, 96), False), ("rms", (7, 130), False),
                                             ("layer", (4, 3, 100), True), ("layer", (9, 64), False)])
def test_triton_matches_reference_fp32(kind, shape, bias):
    x, w, b, grad = _norm_case(shape, torch.float32, bias=bias)
    inputs = [x, w] + ([b] if bias else [])
    got = _forward_backward(_ops(kind, "triton"), inputs, grad)
    want = _forward_backward(_ops(kind, "reference"), inputs, grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def _fp32_reference_error(kind, x, w, b, grad, got):
    """Errors of `got` and of a plain fp16 PyTorch computation, both against the fp32 reference."""
    ref = rms_norm_reference if kind == "rms" else (lambda x, w, b=None: layer_norm_reference(x, w, b, 1e-5))
    inputs = [x, w] + ([b] if b is not None else [])

    def plain(x, w, b=None):  # what a naive low-precision implementation computes
        if kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w.to(x.dtype)
        mean = x.mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + 1e-5) * w.to(x.dtype)
        return y if b is None else y + b.to(x.dtype)

    exact = _forward_backward(lambda *t: ref(*t, 1e-5) if kind == "rms" else ref(*t),
                              [t.float() for t in inputs], grad.float())
    naive = _forward_backward(plain, inputs, grad)
    return ([(a.float() - e).abs().max().item() for a, e in zip(got, exact)],
            [(a.float() - e).abs().max().item() for a, e in zip(naive, exact)])


@pytest.mark.parametrize("kind,weight_dtype", [("rms", torch.float16), ("rms", torch.float32),
                                               ("layer", torch.float16)])
def test_triton_fp16_within_twice_plain_fp16_error(kind, weight_dtype):
    x, w, b, grad = _norm_case((6, 200), torch.float16, weight_dtype, bias=kind == "layer")
    inputs = [x, w] + ([b] if b is not None else [])
    got = _forward_backward(_ops(kind, "triton"), inputs, grad)
    assert got[0].dtype == torch.float16 and got[2].dtype == weight_dtype
    errors, naive = _fp32_reference_error(kind, x, w, b, grad, got)
    for err, base in zip(errors, naive):
        assert err <= 2 * base + 1e-3, (errors, naive)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_gpu_bf16_full_size(backend, weight_dtype):
    if backend == "cuda":
        from megalm.kernels import _cuda
        if _cuda.extension() is None:
            pytest.fail(f"CUDA extension unavailable on a CUDA machine: {_cuda.unavailable_reason()}")
    x, w, _, grad = _norm_case((4096, 4096), torch.bfloat16, weight_dtype)
    got = _forward_backward(_ops("rms", backend), [x, w], grad)
    errors, naive = _fp32_reference_error("rms", x, w, None, grad, got)
    for err, base in zip(errors, naive):
        assert err <= 2 * base + 1e-2, (errors, naive)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_extension_odd_width_and_fp32():
    from megalm.kernels import _cuda
    if _cuda.extension() is None:
        pytest.fail(f"CUDA extension unavailable on a CUDA machine: {_cuda.unavailable_reason()}")
    for shape, dtype in [((33, 1000), torch.float32), ((17, 4099), torch.float16)]:
        x, w, _, grad = _norm_case(shape, dtype)
        got = _forward_backward(_ops("rms", "cuda"), [x, w], grad)
        want = _forward_backward(_ops("rms", "reference"), [x, w], grad)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=tol, rtol=tol)
