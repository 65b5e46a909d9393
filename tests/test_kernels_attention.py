"""Attention backends against the fp32 reference: Triton flash attention (forward and backward,
causal / full, GQA, odd lengths and head dims, strided inputs), SDPA, bottom-right causal masks."""

import os

import pytest
import torch

import megalm.kernels as K

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _qkv(b, s_q, s_k, n_q, n_kv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, n_q, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, s_k, n_kv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(b, s_k, n_kv, d, generator=g).to(DEVICE, dtype)
    grad = torch.randn(b, s_q, n_q, d, generator=g).to(DEVICE, dtype)
    return q, k, v, grad


def _run(fn, q, k, v, grad, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _plain(q, k, v, causal=True):
    """A naive implementation in the inputs' own precision (FlashAttention's error baseline)."""
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    scores = (qt @ kt.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if causal:
        s_q, s_k = q.shape[1], k.shape[1]
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1) @ vt).transpose(1, 2)


CASES = [  # b, s_q, s_k, n_q, n_kv, d, causal
    (2, 37, 37, 4, 2, 32, True),    # GQA, length not a multiple of the block
    (1, 20, 45, 2, 1, 16, True),    # decoding-style: queries are the last 20 of 45 positions
    (2, 33, 50, 2, 2, 24, False),   # head dim padded 24 -> 32
    (1, 48, 48, 1, 1, 64, True),    # whole blocks
]


@pytest.mark.parametrize("b,s_q,s_k,n_q,n_kv,d,causal", CASES)
def test_triton_matches_reference_fp32(b, s_q, s_k, n_q, n_kv, d, causal):
    q, k, v, grad = _qkv(b, s_q, s_k, n_q, n_kv, d)
    got = _run(K.attention, q, k, v, grad, causal=causal, backend="triton")
    want = _run(K.attention, q, k, v, grad, causal=causal, backend="reference")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-5)


def test_triton_on_strided_views_of_fused_qkv():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 19, 4 + 2 * 2, 32, generator=g).to(DEVICE)
    grad = torch.randn(2, 19, 4, 32, generator=g).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        leaf = qkv.detach().clone().requires_grad_()
        out = K.attention(leaf[:, :, :4], leaf[:, :, 4:6], leaf[:, :, 6:], causal=True, softmax_scale=0.3,
                          backend=backend)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_fp16_within_twice_plain_fp16_error(causal):
    q, k, v, grad = _qkv(1, 40, 40, 4, 2, 32, torch.float16, seed=2)
    got = _run(K.attention, q, k, v, grad, causal=causal, backend="triton")
    assert got[0].dtype == torch.float16
    exact = _run(K.attention, q.float(), k.float(), v.float(), grad.float(), causal=causal, backend="reference")
    naive = _run(_plain, q, k, v, grad, causal=causal)
    for name, a, n, e in zip(("out", "dq", "dk", "dv"), got, naive, exact):
        err, base = (a.float() - e).abs().max().item(), (n.float() - e).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: triton {err:.2e}, plain fp16 {base:.2e}"


@pytest.mark.parametrize("b,s_q,s_k,n_q,n_kv,d,causal", CASES[:3])
def test_sdpa_matches_reference(b, s_q, s_k, n_q, n_kv, d, causal):
    q, k, v, grad = _qkv(b, s_q, s_k, n_q, n_kv, d)
    got = _run(K.attention, q, k, v, grad, causal=causal, backend="sdpa")
    want = _run(K.attention, q, k, v, grad, causal=causal, backend="reference")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_causal_with_fewer_queries_is_bottom_right_aligned(backend):
    """The last query sees every key; query i of s_q sees keys up to s_k - s_q + i."""
    q, k, v, _ = _qkv(1, 3, 10, 2, 2, 16)
    out = K.attention(q, k, v, causal=True, backend=backend)
    for i in range(3):
        visible = 10 - 3 + i + 1
        want = K.attention(q[:, i:i + 1], k[:, :visible], v[:, :visible], causal=False, backend="reference")
        torch.testing.assert_close(out[:, i:i + 1], want, atol=1e-5, rtol=1e-5)


def test_triton_backward_takes_expanded_gradients():
    q, k, v, _ = _qkv(1, 9, 9, 2, 2, 16)
    grads = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        K.attention(*leaves, backend=backend).sum().backward()  # d out: stride 0 everywhere
        grads.append([t.grad for t in leaves])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-5)


def test_cpu_auto_uses_sdpa_and_dropout_runs():
    q, k, v, _ = _qkv(1, 8, 8, 2, 1, 16)
    torch.testing.assert_close(K.attention(q, k, v), K.attention(q, k, v, backend="reference"), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    assert torch.isfinite(K.attention(q, k, v, dropout_p=0.5)).all()


def test_fast_paths_compile_without_graph_breaks():
    """The Triton paths are autograd Functions over torch.library custom ops: torch.compile traces
    them into one graph (aot_eager keeps this quick on CPU; inductor treats them the same way)."""
    q, k, v, grad = _qkv(1, 16, 16, 2, 1, 16)
    w = torch.ones(16, device=DEVICE)

    def block(q, k, v):
        out = K.attention(q, k, v, causal=True, backend="triton")
        return K.rms_norm(out, w, 1e-5, backend="triton")

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = _run(compiled, q, k, v, grad)
    want = _run(block, q, k, v, grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("s,n_q,n_kv,d,causal", [(1024, 16, 16, 128, True), (1000, 16, 4, 64, True),
                                                 (512, 8, 8, 128, False)])
def test_gpu_bf16_within_twice_plain_bf16_error(s, n_q, n_kv, d, causal):
    q, k, v, grad = _qkv(2, s, s, n_q, n_kv, d, torch.bfloat16, seed=3)
    got = _run(K.attention, q, k, v, grad, causal=causal, backend="triton")
    exact = _run(K.attention, q.float(), k.float(), v.float(), grad.float(), causal=causal, backend="reference")
    naive = _run(_plain, q, k, v, grad, causal=causal)
    for name, a, n, e in zip(("out", "dq", "dk", "dv"), got, naive, exact):
        err, base = (a.float() - e).abs().max().item(), (n.float() - e).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: triton {err:.2e}, plain bf16 {base:.2e}"


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_picks_a_working_backend():
    q, k, v, grad = _qkv(2, 512, 512, 8, 2, 64, torch.bfloat16)
    got = _run(K.attention, q, k, v, grad, causal=True)
    want = _run(K.attention, q, k, v, grad, causal=True, backend="sdpa")
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e.float(), atol=3e-2, rtol=3e-2)
