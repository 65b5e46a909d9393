"""MoE kernels (top-k router, token permutation, grouped GEMM) against their references, forward and
backward; on CPU the Triton kernels run under TRITON_INTERPRET=1."""

import os

import pytest
import torch

import megalm.kernels as K
from megalm.kernels.moe_permute import expert_capacity

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- router

@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize,scaling", [(False, None), (True, 2.5)])
@pytest.mark.parametrize("topk,experts", [(1, 4), (2, 7), (6, 16), (3, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_router_triton_matches_reference(score_function, normalize, scaling, topk, experts, with_bias):
    g = _gen(topk * 100 + experts)
    logits = torch.randn(13, experts, generator=g).to(DEVICE)
    d_weights, d_scores = torch.randn(13, topk, generator=g).to(DEVICE), torch.randn(13, experts, generator=g).to(DEVICE)
    # a bias of the scores' size, which reorders the choice (aux-loss-free balancing)
    bias = torch.randn(experts, generator=g).to(DEVICE) * 0.3 if with_bias else None
    results = []
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        weights, indices, scores = K.topk_router(z, topk, score_function, normalize, scaling, backend=backend,
                                                 bias=bias)
        ((weights * d_weights).sum() + (scores * d_scores).sum()).backward()
        results.append((weights, indices, scores, z.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,group_topk,topk", [(4, 2, 4), (8, 3, 6), (2, 1, 2)])
def test_group_limited_router_triton_matches_reference(score_function, groups, group_topk, topk):
    """Each token's experts come from its best groups only, on both paths, forward and backward."""
    g = _gen(groups * 10 + topk)
    experts = 16
    logits = torch.randn(29, experts, generator=g).to(DEVICE)
    bias = torch.randn(experts, generator=g).to(DEVICE) * 0.2
    d_weights = torch.randn(29, topk, generator=g).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        weights, indices, scores = K.topk_router(z, topk, score_function, True, 1.5, backend=backend, bias=bias,
                                                 num_groups=groups, group_topk=group_topk)
        (weights * d_weights).sum().backward()
        results.append((weights, indices, scores, z.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    indices = results[0][1]
    per_group = experts // groups
    assert all(len(set((indices[i] // per_group).tolist())) <= group_topk for i in range(29))
    # the groups kept are the best by the sum of their top k / group_topk biased scores
    choice = (results[0][2] + bias).view(29, groups, per_group).topk(topk // group_topk, dim=-1).values.sum(-1)
    best = choice.topk(group_topk, dim=-1).indices
    assert all(set((indices[i] // per_group).tolist()) <= set(best[i].tolist()) for i in range(29))


def test_group_limited_routing_rejects_impossible_shapes():
    logits = torch.randn(3, 12)
    for groups, group_topk, topk in ((5, 1, 2), (4, 5, 4), (4, 1, 4), (4, 2, 1)):
        with pytest.raises(ValueError, match="group-limited routing needs"):
            K.topk_router(logits, topk, "sigmoid", num_groups=groups, group_topk=group_topk)


def test_router_bias_changes_the_choice_not_the_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=DEVICE)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0], device=DEVICE)  # pulls the last expert in
    for backend in ("triton", "reference"):
        weights, indices, scores = K.topk_router(logits, 2, "sigmoid", False, None, backend=backend, bias=bias)
        assert indices.tolist() == [[3, 0]], backend
        torch.testing.assert_close(weights, scores[:, [3, 0]])  # the unbiased scores


def test_router_normalized_weights_sum_to_scaling():
    logits = torch.randn(9, 8, generator=_gen(1)).to(DEVICE)
    weights, indices, _ = K.topk_router(logits, 3, "sigmoid", True, 2.0, backend="triton")
    torch.testing.assert_close(weights.sum(-1), torch.full((9,), 2.0, device=DEVICE))
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token


# -- permutation

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("capacity_factor,pad", [(None, False), (0.8, False), (0.8, True), (2.0, True)])
def test_permute_unpermute_triton_match_reference(dtype, capacity_factor, pad):
    g = _gen(3)
    t, k, experts, h = 11, 2, 6, 37
    indices = torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(t)])  # expert 5 idle
    probs = torch.rand(t, k, generator=g)
    routing = K.expert_rows(indices.to(DEVICE), experts, probs.to(DEVICE), capacity_factor, pad)
    assert routing.tokens_per_expert[-1] == (expert_capacity(t, k, experts, capacity_factor) if pad else 0)
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    weights, dout = torch.rand(t, k, generator=g).to(DEVICE), torch.randn(t, h, generator=g).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        rows = K.permute(xx, routing, backend=backend)
        y = rows.float().sin().to(dtype)  # a stand-in for the experts
        out = K.unpermute(y, routing, ww, backend=backend)
        (out.float() * dout).sum().backward()
        results.append((rows, out, xx.grad, ww.grad))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_expert_rows_dropless_groups_rows_by_expert():
    indices = torch.tensor([[2, 0], [0, 1], [2, 1]])
    routing = K.expert_rows(indices, 4)
    assert routing.dropless and routing.num_rows == 6
    assert routing.tokens_per_expert.tolist() == [2, 2, 2, 0]
    expert_of_row = torch.empty(6, dtype=torch.long)
    expert_of_row[routing.rows.reshape(-1)] = indices.reshape(-1)
    assert expert_of_row.tolist() == [0, 0, 1, 1, 2, 2]


def test_capacity_drops_lowest_probability_assignments():
    # 4 tokens, top-1, 2 experts, factor 1 -> capacity 2; expert 0 gets 3 tokens: the least likely drops.
    indices = torch.tensor([[0], [0], [0], [1]])
    probs = torch.tensor([[0.9], [0.2], [0.7], [0.6]])
    routing = K.expert_rows(indices, 2, probs, capacity_factor=1.0)
    assert routing.rows[1, 0] == -1 and (routing.rows[[0, 2, 3], 0] >= 0).all()
    assert int(routing.dropped) == 1 and routing.num_rows == 3
    padded = K.expert_rows(indices, 2, probs, capacity_factor=1.0, pad=True)
    assert padded.num_rows == 4 and padded.tokens_per_expert.tolist() == [2, 2]
    assert padded.rows[3, 0] == 2  # expert 1 starts at row capacity


# -- grouped GEMM

def test_tile_table_maps_programs_to_experts():
    from megalm.kernels._triton.grouped_gemm import tile_table
    expert, start, end = tile_table(torch.tensor([5, 0, 19, 1]), 25, 16)
    real = expert >= 0
    assert expert[real].tolist() == [0, 2, 2, 3]
    assert start[real].tolist() == [0, 5, 21, 24] and end[real].tolist() == [5, 24, 24, 25]
    assert (start[~real] == end[~real]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts", [[5, 0, 19, 1, 0, 7], [0, 0, 33], [1]])
def test_grouped_gemm_triton_matches_reference(dtype, counts):
    g = _gen(len(counts))
    counts = torch.tensor(counts)
    m, k, n = int(counts.sum()), 21, 35
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (0.2 * torch.randn(len(counts), n, k, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    results = []
    for backend, cast in (("triton", dtype), ("reference", torch.float32)):
        xx, ww = x.to(cast).detach().clone().requires_grad_(), w.to(cast).detach().clone().requires_grad_()
        y = K.grouped_gemm(xx, ww, counts.to(DEVICE), backend=backend)
        y.backward(dy.to(cast))
        results.append((y, xx.grad, ww.grad))
    # fp32: exact in the interpreter (TF32 on a GPU); fp16: inputs rounded, fp32 accumulation.
    tol = (1e-4 if DEVICE == "cpu" else 2e-2) if dtype == torch.float32 else 2e-2
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert (results[0][2][counts == 0] == 0).all()  # an expert without tokens gets a zero gradient


# -- GPU: full size, bf16, and the CUDA permutation kernels

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_permute_gpu_bf16_matches_reference(backend):
    from megalm.kernels import _cuda
    if backend == "cuda" and _cuda.extension() is None:
        pytest.skip(_cuda.unavailable_reason())
    g = _gen(5)
    t, k, experts, h = 4096, 6, 64, 2048
    indices = torch.topk(torch.rand(t, experts, generator=g), k).indices.cuda()
    routing = K.expert_rows(indices, experts)
    x = torch.randn(t, h, generator=g).cuda().bfloat16()
    weights = torch.rand(t, k, generator=g).cuda()
    results = []
    for b in (backend, "reference"):
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = K.unpermute(K.permute(xx, routing, backend=b) * 2, routing, ww, backend=b)
        out.float().sum().backward()
        results.append((out, xx.grad, ww.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_grouped_gemm_gpu_bf16_within_twice_torch_error():
    g = _gen(6)
    counts = torch.tensor([700, 0, 1500, 33, 2000, 1, 900, 64]).cuda()
    m, k, n = int(counts.sum()), 2048, 1408
    x = torch.randn(m, k, generator=g).cuda()
    w = (0.02 * torch.randn(8, n, k, generator=g)).cuda()
    exact = K.grouped_gemm(x, w, counts, backend="reference")
    ours = K.grouped_gemm(x.bfloat16(), w.bfloat16(), counts, backend="triton").float()
    torch_bf16 = K.grouped_gemm(x.bfloat16(), w.bfloat16(), counts, backend="reference").float()
    assert (ours - exact).abs().max() <= 2 * (torch_bf16 - exact).abs().max() + 1e-3


_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from megalm.kernels._triton import grouped_gemm as G, moe_permute as P, moe_router as R
target = GPUTarget("cuda", 90, 32)
def compile(fn, signature, constexprs, warps):
    triton.compile(ASTSource(fn, signature, constexprs), target=target, options={"num_warps": warps, "num_stages": 3})
for sigmoid in (True, False):
    for bias in (True, False):
        compile(R._router_forward_kernel, {"Z": "*fp32", "B": "*fp32", "W": "*fp32", "IDX": "*i64", "S": "*fp32",
                "E": "i32", "b_stride": "i32", "scaling": "fp32"}, {"TOPK": 6, "SIGMOID": sigmoid, "NORMALIZE": True, "HAS_BIAS": bias,
                "BLOCK_E": 64, "BLOCK_K": 8}, 4)
    compile(R._router_backward_kernel, {"Z": "*fp32", "IDX": "*i64", "DW": "*fp32", "DS": "*fp32", "DZ": "*fp32",
            "E": "i32", "scaling": "fp32"}, {"TOPK": 6, "SIGMOID": sigmoid, "NORMALIZE": True, "BLOCK_E": 64,
            "BLOCK_K": 8}, 4)
for dt in ("bf16", "fp32"):
    for weighted in (False, True):
        compile(P._scatter_kernel, {"X": f"*{dt}", "ROWS": "*i64", "WEIGHTS": "*fp32", "OUT": f"*{dt}", "Y": f"*{dt}",
                "DW": "*fp32", "H": "i32"}, {"TOPK": 6, "HAS_WEIGHTS": weighted, "COMPUTE_DW": weighted,
                "BLOCK_H": 1024}, 4)
        compile(P._gather_kernel, {"Y": f"*{dt}", "ROWS": "*i64", "WEIGHTS": "*fp32", "OUT": f"*{dt}", "H": "i32"},
                {"TOPK": 6, "HAS_WEIGHTS": weighted, "BLOCK_H": 1024}, 4)
    compile(G._grouped_gemm_kernel, {"X": f"*{dt}", "W": f"*{dt}", "Y": f"*{dt}", "TILE_EXPERT": "*i32",
            "TILE_ROW_START": "*i32", "TILE_ROW_END": "*i32", "N": "i32", "K": "i32", "stride_xm": "i32",
            "stride_we": "i32", "stride_bk": "i32", "stride_bn": "i32", "stride_ym": "i32"},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8)
    compile(G._weight_grad_kernel, {"DY": f"*{dt}", "X": f"*{dt}", "DW": f"*{dt}", "OFFSETS": "*i32", "N": "i32",
            "K": "i32", "stride_dym": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wn": "i32"},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, 8)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs Python; this compiles the real kernels (PTX and cubin for an H100)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("expert_bias", [False, True])
def test_moe_layer_compiles_fullgraph_with_triton_kernels(monkeypatch, expert_bias):
    from megalm.model.moe import MoELayer
    from tests.test_moe import moe_config
    monkeypatch.setenv("MEGALM_KERNELS", "triton")
    torch.manual_seed(0)
    layer = MoELayer(moe_config(moe_shared_expert_intermediate_size=16, moe_aux_loss_coeff=0.1,
                                moe_router_enable_expert_bias=expert_bias), 0).to(DEVICE)
    if expert_bias:
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 4))
    x = torch.randn(2, 5, 32, device=DEVICE)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    if expert_bias:  # the compiled forward counted the same 10 x 2 assignments again
        assert layer.router.tokens_since_update.sum().item() == 2 * 10 * 2


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_moe_layer_gpu_bf16_within_twice_torch_error(monkeypatch, kernels):
    """The layer at DeepSeek-like proportions in bf16 autocast: fused path vs the fp32 reference."""
    from megalm.kernels import _cuda
    from megalm.model.moe import MoELayer
    from tests.test_moe import moe_config
    if kernels == "cuda" and _cuda.extension() is None:
        pytest.skip(_cuda.unavailable_reason())
    config = moe_config(hidden_size=1024, num_experts=64, moe_router_topk=6, moe_ffn_hidden_size=352,
                        moe_shared_expert_intermediate_size=704)
    torch.manual_seed(0)
    layer = MoELayer(config, 0).cuda()
    x = torch.randn(4, 512, 1024, device="cuda")
    monkeypatch.setenv("MEGALM_KERNELS", "reference")
    with torch.no_grad():
        exact = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch_bf16 = layer(x).float()
    monkeypatch.setenv("MEGALM_KERNELS", kernels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = layer(x)
    ours.float().square().mean().backward()
    assert (ours.float() - exact).abs().max() <= 2 * (torch_bf16 - exact).abs().max() + 1e-3
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
