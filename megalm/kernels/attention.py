"""Scaled dot-product attention, batch-first: reference, SDPA, Triton flash attention, dispatch.

q is [b, s_q, n_q, d]; k and v are [b, s_k, n_kv, d] with n_q % n_kv == 0 (grouped-query attention:
query head h reads key/value head h // (n_q / n_kv)); the output is [b, s_q, n_q, d].

Causal masking is aligned to the bottom-right corner: query i sits at absolute position
``s_k - s_q + i`` and sees keys 0..s_k - s_q + i. With s_q == s_k this is the usual lower
triangle; with s_q < s_k the queries are the last s_q positions (decoding with a KV cache).
Causal attention with s_q > s_k is rejected (some queries would see no key at all).

Packed documents: ``document_ids`` [b, s] (integers, self-attention with s_q == s_k) restricts
each query to the keys that carry its own id, on top of the causal mask: several documents packed
into one row then attend exactly as each would alone. Every backend takes them (see below; the
Triton kernel skips the key blocks of other documents).

Backends:

- ``reference``: explicit fp32 math (K/V heads repeated, full score matrix, softmax, dropout);
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` on [b, n, s, d] views, with
  ``enable_gqa`` for grouped-query attention and an explicit bottom-right mask when s_q != s_k;
  with document ids a boolean [b, 1, s, s] mask (causal and same document);
- ``triton``: our flash attention (online softmax, O(s) memory, FlashAttention-2 backward, GQA
  without copying K/V). No dropout: ``dropout_p > 0`` runs SDPA instead, with a one-time warning
  (an error when ``backend="triton"`` is passed explicitly);
- ``auto``: on CPU, ``sdpa``. On a GPU, the first call for a shape class (batch, s_q and s_k
  rounded up to a power of two, heads, head dim, causal, dtype, device, training or not) times our
  Triton kernel and SDPA's flash, cuDNN and memory-efficient backends on random inputs of that
  shape (forward + backward when gradients are needed; with the call's document ids, if any),
  keeps the fastest for the rest of the process and logs the choice once. While `torch.compile` traces or a CUDA graph is captured no
  timing runs: an already-made choice is reused, otherwise plain SDPA (which picks its own backend).

``MEGALM_KERNELS=triton`` (or ``cuda``) forces the Triton kernel and ``=reference`` the reference
for calls made with ``backend="auto"``.
"""

import contextlib
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megalm.kernels import dispatch

logger = logging.getLogger("megalm.kernels")

BACKENDS = ("auto", "reference", "sdpa", "triton")
_MAX_TRITON_HEAD_DIM = 256


def _causal_mask(s_q: int, s_k: int, device) -> Tensor:
    """[s_q, s_k] bool, True where query i may attend key j (bottom-right aligned)."""
    return torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(diagonal=s_k - s_q)


def _visibility_mask(s_q: int, s_k: int, causal: bool, document_ids: Optional[Tensor], device) -> Optional[Tensor]:
    """True where query i may attend key j: [s_q, s_k], or [b, 1, s, s] with document ids; None
    when every key is visible."""
    mask = _causal_mask(s_q, s_k, device) if causal else None
    if document_ids is not None:
        same = (document_ids[:, :, None] == document_ids[:, None, :])[:, None]   # [b, 1, s, s]
        mask = same if mask is None else same & mask
    return mask


def attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                        softmax_scale: Optional[float] = None, dropout_p: float = 0.0,
                        document_ids: Optional[Tensor] = None) -> Tensor:
    group = q.shape[2] // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qf = q.float().transpose(1, 2)                                   # [b, n_q, s_q, d]
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)   # [b, n_q, s_k, d]
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * scale                     # [b, n_q, s_q, s_k]
    mask = _visibility_mask(q.shape[1], k.shape[1], causal, document_ids, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ vf).transpose(1, 2).to(q.dtype)                  # [b, s_q, n_q, d]


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                   softmax_scale: Optional[float] = None, dropout_p: float = 0.0,
                   document_ids: Optional[Tensor] = None) -> Tensor:
    s_q, s_k = q.shape[1], k.shape[1]
    mask = None
    if document_ids is not None or (causal and s_q != s_k):
        mask = _visibility_mask(s_q, s_k, causal, document_ids, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        is_causal=causal and mask is None, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@torch.library.custom_op("megalm::flash_attention_forward", mutates_args=())
def _flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                   document_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """-> (out [b, s_q, n_q, d] contiguous, lse [b, n_q, s_q] fp32, natural-log logsumexp of scores)."""
    from megalm.kernels._triton.attention import flash_forward
    return flash_forward(q, k, v, causal, scale, document_ids)


@_flash_forward.register_fake
def _(q, k, v, causal, scale, document_ids=None):
    b, s_q, n_q, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(b, n_q, s_q, dtype=torch.float32)


@torch.library.custom_op("megalm::flash_attention_backward", mutates_args=())
def _flash_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                    scale: float, document_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    from megalm.kernels._triton.attention import flash_backward
    return flash_backward(do, q, k, v, out, lse, causal, scale, document_ids)


@_flash_backward.register_fake
def _(do, q, k, v, out, lse, causal, scale, document_ids=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, document_ids=None):
        out, lse = _flash_forward(q, k, v, causal, scale, document_ids)
        ctx.save_for_backward(q, k, v, out, lse, document_ids)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, document_ids = ctx.saved_tensors
        if do.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
            do = do.contiguous()
        dq, dk, dv = _flash_backward(do, q, k, v, out, lse, ctx.causal, ctx.scale, document_ids)
        return dq, dk, dv, None, None, None


def attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                     softmax_scale: Optional[float] = None, document_ids: Optional[Tensor] = None) -> Tensor:
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, float(scale), document_ids)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: expected q, k, v of rank 4 [b, s, n, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         f"q [b, s_q, n_q, d], k = v [b, s_k, n_kv, d]")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"attention: causal attention needs s_q <= s_k (queries are the last s_q positions), "
                         f"got s_q={q.shape[1]}, s_k={k.shape[1]}")


def _check_document_ids(q: Tensor, k: Tensor, document_ids: Tensor) -> None:
    if not isinstance(document_ids, Tensor) or document_ids.is_floating_point() or document_ids.is_complex() \
            or document_ids.dtype == torch.bool:
        kind = document_ids.dtype if isinstance(document_ids, Tensor) else type(document_ids).__name__
        raise ValueError(f"attention: document_ids must be an integer tensor [b, s], got {kind}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: document_ids apply to self-attention over one packed sequence (s_q == s_k), "
                         f"got s_q={q.shape[1]}, s_k={k.shape[1]}: decoding with a KV cache takes no document ids")
    if tuple(document_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"attention: document_ids {tuple(document_ids.shape)} do not match q's [b, s] = "
                         f"{tuple(q.shape[:2])}")
    if document_ids.device != q.device:
        raise ValueError(f"attention: document_ids are on {document_ids.device}, q on {q.device}")


def triton_unsupported(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the Triton kernel cannot take these inputs, or None."""
    reason = dispatch.triton_unsupported_device(q, k, v)
    if reason is not None:
        return reason
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dispatch.FLOAT_DTYPES:
        return f"unsupported dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.shape[-1] > _MAX_TRITON_HEAD_DIM or q.shape[-1] < 1:
        return f"head dim {q.shape[-1]} > {_MAX_TRITON_HEAD_DIM}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "the last dim of q, k and v must be contiguous"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    return None


# ---- auto: one timing per shape class -------------------------------------------------------

_choice_cache: dict[tuple, str] = {}


def _sdpa_backend_context(name: str):
    if name == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


def _run(name: str, q, k, v, causal, scale, dropout_p, document_ids):
    if name == "reference":
        return attention_reference(q, k, v, causal, scale, dropout_p, document_ids)
    if name == "triton":
        return attention_triton(q, k, v, causal, scale, document_ids)
    with _sdpa_backend_context(name):
        return attention_sdpa(q, k, v, causal, scale, dropout_p, document_ids)


def _shape_class(q: Tensor, k: Tensor, causal: bool, needs_grad: bool, documents: bool) -> tuple:
    def pow2(n):
        return 1 << max(0, n - 1).bit_length()
    return (q.shape[0], pow2(q.shape[1]), pow2(k.shape[1]), q.shape[2], k.shape[2], q.shape[3], causal,
            q.dtype, q.device, needs_grad, documents)


def _time_candidates(q, k, v, causal, scale, needs_grad: bool, document_ids) -> str:
    candidates = (["triton"] if triton_unsupported(q, k, v) is None else []) + \
        ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"]
    times = {}
    for name in candidates:
        qs, ks, vs = (torch.randn_like(t).requires_grad_(needs_grad) for t in (q, k, v))
        grad = torch.randn_like(qs)
        try:
            with torch.enable_grad() if needs_grad else torch.no_grad():
                def step():
                    out = _run(name, qs, ks, vs, causal, scale, 0.0, document_ids)
                    if needs_grad:
                        torch.autograd.grad(out, (qs, ks, vs), grad)
                step()  # warm-up (and Triton autotuning)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    step()
                end.record()
                end.synchronize()
                times[name] = start.elapsed_time(end) / 3
        except RuntimeError:  # this SDPA backend does not take these inputs
            continue
    best = min(times, key=times.get) if times else "sdpa"
    logger.info("attention auto for q %s k %s %s causal=%s documents=%s: %s (ms: %s)", tuple(q.shape),
                tuple(k.shape), q.dtype, causal, document_ids is not None, best,
                ", ".join(f"{n} {t:.3f}" for n, t in times.items()))
    return best


def _auto_choice(q, k, v, causal, scale, document_ids) -> str:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _shape_class(q, k, causal, needs_grad, document_ids is not None)
    if key in _choice_cache:
        return _choice_cache[key]
    if dispatch.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "sdpa"
    _choice_cache[key] = _time_candidates(q, k, v, causal, scale, needs_grad, document_ids)
    return _choice_cache[key]


def _select(q, k, v, causal, scale, dropout_p, backend, document_ids=None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend in ("reference", "sdpa"):
        return backend
    explicit = backend == "triton"
    forced = "triton" if explicit else dispatch.env_backend()
    if forced == "reference":
        return "reference"
    if forced is not None:  # triton, or cuda (attention has no CUDA kernel: Triton)
        reason = triton_unsupported(q, k, v)
        if reason is None and dropout_p > 0.0:
            if explicit:
                raise dispatch.KernelUnsupportedError(
                    f"attention: backend='triton' cannot run here: dropout_p={dropout_p} (no dropout in the kernel)")
            dispatch.warn_once("attention", "the Triton kernel has no dropout: attention dropout runs through SDPA")
            return "sdpa"
        if reason is not None:
            source = "backend='triton'" if explicit else f"{dispatch.ENV_VAR}={forced}"
            raise dispatch.KernelUnsupportedError(f"attention: {source} forces triton, which cannot run here: {reason}")
        return "triton"
    if q.device.type != "cuda":
        return "sdpa"
    if dropout_p > 0.0:
        dispatch.warn_once("attention", "the Triton kernel has no dropout: attention dropout runs through SDPA")
        return "sdpa"
    return _auto_choice(q, k, v, causal, scale, document_ids)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, softmax_scale: Optional[float] = None,
              dropout_p: float = 0.0, backend: str = "auto", document_ids: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask] [+ document mask]) v for q [b, s_q, n_q, d], k / v [b, s_k, n_kv, d].

    Returns [b, s_q, n_q, d] in q's dtype. softmax_scale defaults to 1 / sqrt(d).
    backend: auto | reference | sdpa | triton (see the module docstring).
    document_ids: [b, s] integers for self-attention (s_q == s_k): query i attends key j only where
    document_ids[:, i] == document_ids[:, j] (packed sequences; every backend takes them).
    """
    _check_shapes(q, k, v, causal)
    if document_ids is not None:
        _check_document_ids(q, k, document_ids)
    impl = _select(q, k, v, causal, softmax_scale, dropout_p, backend, document_ids)
    return _run(impl, q, k, v, causal, softmax_scale, dropout_p, document_ids)
