"""Triton flash attention, forward and backward (FlashAttention-2 schedule), batch-first layout.

Layout: q [b, s_q, n_q, d], k / v [b, s_k, n_kv, d], any strides with a contiguous last dim.
Query head h uses key/value head h // group (group = n_q / n_kv); K and V are never copied.
Causal masks are bottom-right aligned: query i sees keys j <= i + (s_k - s_q).

Forward: one program per (query block, batch x head) streams key blocks with an online softmax
in base 2 (scores pre-multiplied by scale * log2(e)), never holding more than a
[BLOCK_M, BLOCK_N] tile of scores. It stores the output and lse2 = log2(sum(exp2(scores))) per
query row in fp32, the only softmax state the backward pass needs.
Key blocks split into those every query row of the tile may see (no mask work) and the few that
straddle the diagonal or the end of the sequence (masked).

Packed documents (`document_ids` [b, s], self-attention with s_q == s_k): query i sees key j only
when both carry the same id. `document_bounds` gives every token the span of its document and the
run of equal ids around it. A query tile skips the key blocks before the earliest span start of its
rows and after the latest span end; the key blocks that lie in every row's own run and below the
diagonal need no mask; the others compare ids inside the tile. The backward kernels bound their loops
the same way. Skipping assumes ids that never decrease along a row, as packing makes them: a row
whose ids do decrease somewhere gets the whole row as its span, so it skips no block; its results
stay exact, since the mask compares the ids themselves and runs are exact whatever the ids.

Backward, with P = exp2(scores - lse2), dP = dO V^T, dS = P * (dP - delta):
1. delta = rowsum(dO * O) per query row;
2. one program per (key block, batch x kv head) loops over the query heads of its group and over
   query blocks, accumulating dK = scale * dS^T Q and dV = P^T dO in registers (no atomics: a kv
   head's gradient is summed over its query heads inside one program);
3. one program per (query block, batch x head) loops over key blocks for dQ = scale * dS K.

On a GPU the block sizes are autotuned per (head dim, causal, documents, sequence bucket, dtype); under
TRITON_INTERPRET small fixed blocks keep the CPU tests quick. Block sizes never go below 16, the
smallest tile `tl.dot` accepts; head dims that are not a power of two are padded and masked.
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2, triton_interpreting
from megalm.kernels._triton.configs import shared_memory_prune, tile_estimate

LOG2E = 1.4426950408889634


# ---- tile access ------------------------------------------------------------------------------
# The head-dim mask exists only when the head dim is padded (a compile-time choice), so that the
# common case loads whole rows with vector instructions; row masks are constant along a row.

@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, value, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


# ---- forward ---------------------------------------------------------------------------------

@triton.jit
def _query_tile_key_range(start_m, causal_offset, s_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """(full, end) for query tile `start_m`: keys [0, full) are visible to every row of the tile and
    lie inside the sequence (no mask needed); keys [full, end) need the causal / length mask."""
    if CAUSAL:
        end = tl.minimum(s_k, (start_m + 1) * BLOCK_M + causal_offset)
        full = tl.minimum((start_m * BLOCK_M + causal_offset + 1) // BLOCK_N * BLOCK_N, s_k // BLOCK_N * BLOCK_N)
    else:
        end = s_k
        full = s_k // BLOCK_N * BLOCK_N
    return full, end


@triton.jit
def _visible(offs_m, offs_n, q_doc, doc_base, s_k, causal_offset, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: which keys of the tile each query row may attend."""
    visible = offs_n[None, :] < s_k
    if CAUSAL:
        visible = visible & (offs_m[:, None] + causal_offset >= offs_n[None, :])
    if HAS_DOCS:
        k_doc = tl.load(doc_base + offs_n, mask=offs_n < s_k, other=0)
        visible = visible & (q_doc[:, None] == k_doc[None, :])
    return visible


@triton.jit
def _forward_key_blocks(acc, l_i, m_i, q, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs, offs_m, offs_d,
                        start, end, s_k, causal_offset, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], offs_n, s_k, offs_d, HEAD_DIM, BLOCK_D,
                       MASK)
        scores = tl.dot(q, tl.trans(k)) * scale_log2                     # [BLOCK_M, BLOCK_N] fp32
        if MASK:
            scores = tl.where(_visible(offs_m, offs_n, q_doc, doc_base, s_k, causal_offset, CAUSAL, HAS_DOCS),
                              scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = m_new
        if MASK and HAS_DOCS:
            # A row may meet a whole block of other documents before any key of its own: its max
            # stays -inf, and exp2 is taken against 0 so that (-inf) - (-inf) never enters the sums.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], offs_n, s_k, offs_d, HEAD_DIM, BLOCK_D,
                       MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile_document_range(bounds_base, offs_m, s, full, end, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(start, mid, full, end) for a query tile over packed documents (`document_bounds`): keys
    [start, mid) and [full, end) need the masks, keys [mid, full) lie in every row's own run of ids
    and below the diagonal; keys outside [start, end) belong to no row's document."""
    rows = offs_m < s
    span_start = tl.min(tl.load(bounds_base + offs_m, mask=rows, other=s), axis=0)
    run_start = tl.max(tl.load(bounds_base + s + offs_m, mask=rows, other=0), axis=0)
    span_end = tl.max(tl.load(bounds_base + 3 * s + offs_m, mask=rows, other=0), axis=0)
    start = span_start // BLOCK_N * BLOCK_N
    end = tl.minimum(end, span_end)
    if CAUSAL:
        mid = tl.maximum(tl.minimum(tl.cdiv(run_start, BLOCK_N) * BLOCK_N, full), start)
        full = tl.maximum(full, mid)
    else:  # no run bound at the top: every block in the span is masked
        mid = start
        full = start
    return start, mid, full, end


@triton.jit
def _attention_forward_kernel(Q, K, V, O, LSE, DOC, BOUNDS, scale_log2,
                              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                              n_q, group, s_q, s_k, SEQ_BUCKET,
                              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q).to(tl.int64)
    h = (bh % n_q).to(tl.int64)
    kv_head = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < s_q
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, s_q,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    doc_base = DOC + b * s_k

    causal_offset = s_k - s_q
    full, end = _query_tile_key_range(start_m, causal_offset, s_k, CAUSAL, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mid = 0
    q_doc = offs_m
    if HAS_DOCS:
        # rows past the end take the last row's document: they then see a key, and stay finite
        q_doc = tl.load(doc_base + tl.minimum(offs_m, s_q - 1))
        start, mid, full, end = _query_tile_document_range(BOUNDS + b * 4 * s_q, offs_m, s_q, full, end, CAUSAL,
                                                           BLOCK_N)
        acc, l_i, m_i = _forward_key_blocks(acc, l_i, m_i, q, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs,
                                            offs_m, offs_d, start, mid, s_k, causal_offset, scale_log2, HEAD_DIM,
                                            BLOCK_D, BLOCK_N, True, CAUSAL, HAS_DOCS)
    acc, l_i, m_i = _forward_key_blocks(acc, l_i, m_i, q, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs,
                                        offs_m, offs_d, mid, full, s_k, causal_offset, scale_log2, HEAD_DIM, BLOCK_D,
                                        BLOCK_N, False, CAUSAL, HAS_DOCS)
    acc, l_i, m_i = _forward_key_blocks(acc, l_i, m_i, q, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs,
                                        offs_m, offs_d, full, end, s_k, causal_offset, scale_log2, HEAD_DIM, BLOCK_D,
                                        BLOCK_N, True, CAUSAL, HAS_DOCS)
    acc = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * s_q + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    _store_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], acc, offs_m, s_q,
                offs_d, HEAD_DIM, BLOCK_D)


# ---- backward --------------------------------------------------------------------------------

@triton.jit
def _attention_backward_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos,
                                     stride_doh, n_q, s_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q).to(tl.int64)
    h = (bh % n_q).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], offs_m, s_q,
                   offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], offs_m,
                    s_q, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * s_q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < s_q)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, k_doc, q_base, do_base, lse_base, delta_base, doc_base, stride_qs, stride_dos,
                       offs_n, offs_d, start, end, s_q, causal_offset, scale_log2, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_DOCS: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < s_q
        q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, s_q, offs_d, HEAD_DIM, BLOCK_D,
                       True)
        do = _load_tile(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], offs_m, s_q, offs_d, HEAD_DIM,
                        BLOCK_D, True)
        # rows past the end: lse2 = +inf makes their probabilities exactly 0
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * scale_log2 - lse[None, :])   # [BLOCK_N, BLOCK_M]
        if MASK:
            if CAUSAL:
                p_t = tl.where(offs_m[None, :] + causal_offset >= offs_n[:, None], p_t, 0.0)
            if HAS_DOCS:
                q_doc = tl.load(doc_base + offs_m, mask=row_ok, other=0)
                p_t = tl.where(k_doc[:, None] == q_doc[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _key_block_document_range(bounds_base, offs_n, s, start, mid, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(start, mid, mid_end, end) of the query rows for a key block over packed documents: rows
    [start, mid) and [mid_end, end) need the masks, rows [mid, mid_end) lie in every key's own run
    of ids and see the whole block; rows outside [start, end) belong to no key's document."""
    keys = offs_n < s
    span_start = tl.min(tl.load(bounds_base + offs_n, mask=keys, other=s), axis=0)
    run_start = tl.max(tl.load(bounds_base + s + offs_n, mask=keys, other=0), axis=0)
    run_end = tl.min(tl.load(bounds_base + 2 * s + offs_n, mask=keys, other=s), axis=0)
    end = tl.max(tl.load(bounds_base + 3 * s + offs_n, mask=keys, other=0), axis=0)
    start = tl.maximum(start, span_start // BLOCK_M * BLOCK_M)
    if not CAUSAL:
        mid = tl.cdiv(run_start, BLOCK_M) * BLOCK_M
    mid = tl.minimum(tl.maximum(mid, start), end)
    mid_end = tl.maximum(run_end // BLOCK_M * BLOCK_M, mid)
    return start, mid, mid_end, end


@triton.jit
def _attention_backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC, BOUNDS, scale, scale_log2,
                                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                                    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                                    stride_dkb, stride_dks, stride_dkh,
                                    n_q, n_kv, group, s_q, s_k, SEQ_BUCKET,
                                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)
    kv_head = (bh % n_kv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], offs_n,
                   s_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], offs_n,
                   s_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    doc_base = DOC + b * s_q

    causal_offset = s_k - s_q
    if CAUSAL:
        # the first query row that sees key start_n, and the first that sees the whole key block
        first = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
    else:
        first = 0
        full = 0
    full_end = s_q
    end = s_q
    k_doc = offs_n
    if HAS_DOCS:
        k_doc = tl.load(doc_base + offs_n, mask=offs_n < s_k, other=0)
        first, full, full_end, end = _key_block_document_range(BOUNDS + b * 4 * s_k, offs_n, s_k, first, full,
                                                               CAUSAL, BLOCK_M)
    for g in range(0, group):
        h = kv_head * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_q + h) * s_q
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, k_doc, q_base, do_base, LSE + row_base, DELTA + row_base, doc_base,
                                    stride_qs, stride_dos, offs_n, offs_d, first, full, s_q, causal_offset,
                                    scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, HAS_DOCS)
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, k_doc, q_base, do_base, LSE + row_base, DELTA + row_base, doc_base,
                                    stride_qs, stride_dos, offs_n, offs_d, full, full_end, s_q, causal_offset,
                                    scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, HAS_DOCS)
        if HAS_DOCS:
            dk, dv = _dkdv_query_blocks(dk, dv, k, v, k_doc, q_base, do_base, LSE + row_base, DELTA + row_base,
                                        doc_base, stride_qs, stride_dos, offs_n, offs_d, full_end, end, s_q,
                                        causal_offset, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, HAS_DOCS)
    out = b * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    _store_tile(DK + out, dk * scale, offs_n, s_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV + out, dv, offs_n, s_k, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_key_blocks(dq, q, do, lse, delta, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs, offs_m, offs_d,
                   start, end, s_k, causal_offset, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], offs_n, s_k, offs_d, HEAD_DIM, BLOCK_D,
                       MASK)
        v = _load_tile(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], offs_n, s_k, offs_d, HEAD_DIM, BLOCK_D,
                       MASK)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])     # [BLOCK_M, BLOCK_N]
        if MASK:
            p = tl.where(_visible(offs_m, offs_n, q_doc, doc_base, s_k, causal_offset, CAUSAL, HAS_DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attention_backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, BOUNDS, scale, scale_log2,
                                  stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                                  stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                                  stride_dqb, stride_dqs, stride_dqh,
                                  n_q, group, s_q, s_k, SEQ_BUCKET,
                                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q).to(tl.int64)
    h = (bh % n_q).to(tl.int64)
    kv_head = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < s_q
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, s_q,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], offs_m,
                    s_q, offs_d, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + bh.to(tl.int64) * s_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * s_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    doc_base = DOC + b * s_k

    causal_offset = s_k - s_q
    full, end = _query_tile_key_range(start_m, causal_offset, s_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mid = 0
    q_doc = offs_m
    if HAS_DOCS:
        # rows past the end take the last row's document: they then see a key, and stay finite
        q_doc = tl.load(doc_base + tl.minimum(offs_m, s_q - 1))
        start, mid, full, end = _query_tile_document_range(BOUNDS + b * 4 * s_q, offs_m, s_q, full, end, CAUSAL,
                                                           BLOCK_N)
        dq = _dq_key_blocks(dq, q, do, lse, delta, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs, offs_m,
                            offs_d, start, mid, s_k, causal_offset, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                            CAUSAL, HAS_DOCS)
    dq = _dq_key_blocks(dq, q, do, lse, delta, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs, offs_m, offs_d,
                        mid, full, s_k, causal_offset, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_DOCS)
    dq = _dq_key_blocks(dq, q, do, lse, delta, q_doc, k_base, v_base, doc_base, stride_ks, stride_vs, offs_m, offs_d,
                        full, end, s_k, causal_offset, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_DOCS)
    _store_tile(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :], dq * scale,
                offs_m, s_q, offs_d, HEAD_DIM, BLOCK_D)


# ---- launch configuration ----------------------------------------------------------------------

def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_KEY = ["HEAD_DIM", "CAUSAL", "HAS_DOCS", "SEQ_BUCKET"]
_KV, _Q = ("BLOCK_N", "BLOCK_D"), ("BLOCK_M", "BLOCK_D")


def _pruned(kernel: str, streamed, resident) -> dict:
    """Drop, before compiling, the configs whose tiles (streamed ones pipelined over num_stages)
    exceed the GPU's shared memory per block (`configs.shared_memory_prune`)."""
    return {"early_config_prune": shared_memory_prune(kernel, tile_estimate(streamed, resident, "Q"))}


# H100-oriented candidates; the smaller tiles are there for head dims (up to 256) whose large
# tiles do not fit in shared memory: those are pruned before they compile, per architecture.
_forward_tuned = triton.autotune(_configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 4), (64, 64, 4, 3),
    (64, 32, 4, 2)]), key=_KEY, prune_configs_by=_pruned("attention_forward", [_KV, _KV], [_Q]))(
    _attention_forward_kernel)
_dkdv_tuned = triton.autotune(_configs([
    (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 4), (16, 64, 4, 2)]),
    key=_KEY, prune_configs_by=_pruned("attention_backward_dkdv", [_Q, _Q], [_KV, _KV]))(
    _attention_backward_dkdv_kernel)
_dq_tuned = triton.autotune(_configs([
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4), (64, 32, 4, 2), (64, 16, 4, 2)]),
    key=_KEY, prune_configs_by=_pruned("attention_backward_dq", [_KV, _KV], [_Q, _Q]))(
    _attention_backward_dq_kernel)
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _launch(tuned, plain, grid_rows: int, grid_cols: int, *args, **kwargs):
    """Run `tuned` (GPU) or `plain` with small fixed blocks (interpreter); grid dim 0 is `grid_rows`
    cut into BLOCK_M or BLOCK_N pieces, as named by `kwargs['_split']`."""
    split = kwargs.pop("_split")
    if triton_interpreting():
        plain[(triton.cdiv(grid_rows, _INTERPRETER_BLOCKS[split]), grid_cols)](*args, **kwargs, **_INTERPRETER_BLOCKS)
    else:
        tuned[lambda meta: (triton.cdiv(grid_rows, meta[split]), grid_cols)](*args, **kwargs)


def _common(q, k):
    b, s_q, n_q, d = q.shape
    s_k, n_kv = k.shape[1], k.shape[2]
    meta = {"HEAD_DIM": d, "BLOCK_D": max(16, next_power_of_2(d))}
    return b, s_q, n_q, d, s_k, n_kv, next_power_of_2(max(s_q, s_k)), meta


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def document_bounds(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] integer ids -> [b, 4, s] int32: for each token its document's span (SPAN_START, SPAN_END:
    the first position of its id and one past the last) and the run of equal ids around it
    (RUN_START, RUN_END), in the order SPAN_START, RUN_START, RUN_END, SPAN_END.

    A run is exact whatever the ids. The span equals the run where ids never decrease along the
    row (packed documents); a row whose ids decrease somewhere gets the whole row as every span."""
    b, s = document_ids.shape
    pos = torch.arange(s, device=document_ids.device, dtype=torch.int32).expand(b, s)
    change = document_ids[:, 1:] != document_ids[:, :-1]                               # [b, s - 1]
    edge = torch.ones(b, 1, dtype=torch.bool, device=document_ids.device)
    run_start = torch.where(torch.cat((edge, change), 1), pos, 0).cummax(1).values
    run_end = torch.where(torch.cat((change, edge), 1), pos + 1, s).flip(1).cummin(1).values.flip(1)
    ordered = (document_ids[:, 1:] >= document_ids[:, :-1]).all(1, keepdim=True)        # [b, 1]
    span_start = torch.where(ordered, run_start, 0)
    span_end = torch.where(ordered, run_end, s)
    return torch.stack((span_start, run_start, run_end, span_end), 1).to(torch.int32).contiguous()


def _documents(q, document_ids):
    """(DOC, BOUNDS, HAS_DOCS) kernel arguments; without documents the pointers are unused."""
    if document_ids is None:
        return q, q, False
    return document_ids.contiguous(), document_bounds(document_ids), True


def flash_forward(q, k, v, causal: bool, scale: float, document_ids=None):
    """-> (out [b, s_q, n_q, d] contiguous, lse2 [b, n_q, s_q] fp32). document_ids: [b, s] (s_q == s_k)."""
    b, s_q, n_q, d, s_k, n_kv, bucket, meta = _common(q, k)
    doc, bounds, has_docs = _documents(q, document_ids)
    out = torch.empty((b, s_q, n_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, n_q, s_q), dtype=torch.float32, device=q.device)
    _launch(_forward_tuned, _attention_forward_kernel, s_q, b * n_q,
            q, k, v, out, lse, doc, bounds, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            n_q, n_q // n_kv, s_q, s_k, bucket, CAUSAL=causal, HAS_DOCS=has_docs, _split="BLOCK_M", **meta)
    return out, lse


def flash_backward(do, q, k, v, out, lse, causal: bool, scale: float, document_ids=None):
    """-> (dq, dk, dv), contiguous, in the inputs' dtype."""
    b, s_q, n_q, d, s_k, n_kv, bucket, meta = _common(q, k)
    doc, bounds, has_docs = _documents(q, document_ids)
    delta = torch.empty_like(lse)
    block_m = 16 if triton_interpreting() else 64
    _attention_backward_delta_kernel[(triton.cdiv(s_q, block_m), b * n_q)](
        out, do, delta, *_strides(out), *_strides(do), n_q, s_q, HEAD_DIM=d, BLOCK_M=block_m,
        BLOCK_D=meta["BLOCK_D"])
    dq = torch.empty((b, s_q, n_q, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, s_k, n_kv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    _launch(_dkdv_tuned, _attention_backward_dkdv_kernel, s_k, b * n_kv,
            q, k, v, do, lse, delta, dk, dv, doc, bounds, scale, scale * LOG2E, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do), *_strides(dk), n_q, n_kv, n_q // n_kv, s_q, s_k, bucket, CAUSAL=causal,
            HAS_DOCS=has_docs, _split="BLOCK_N", **meta)
    _launch(_dq_tuned, _attention_backward_dq_kernel, s_q, b * n_q,
            q, k, v, do, lse, delta, dq, doc, bounds, scale, scale * LOG2E, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do), *_strides(dq), n_q, n_q // n_kv, s_q, s_k, bucket, CAUSAL=causal,
            HAS_DOCS=has_docs, _split="BLOCK_M", **meta)
    return dq, dk, dv
