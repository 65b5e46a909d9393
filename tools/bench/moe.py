"""Benchmark megalm's MoE layer against a plain PyTorch loop over experts, in one process, on one GPU.

    python tools/bench/moe.py                       # both shapes
    python tools/bench/moe.py --shapes mixtral --reps 20

Both sides hold the same weights and route the same tokens. The loop is what an MoE looks like
without fused kernels (as in Hugging Face's Mixtral before fused experts): router in fp32, top-k,
then for every expert an index of its tokens, its SwiGLU MLP and an `index_add_` of the weighted
output. megalm's layer runs the Triton router, the Triton permutation, two grouped GEMMs over all
experts and the Triton combine. Timed: forward + backward (median over --reps runs after a warm-up,
CUDA events), bf16 autocast with fp32 weights as in training. The table also gives each side's
peak memory. CUDA only.

Shapes (16384 tokens, hidden 2048):
- mixtral: 8 experts, top-2, expert FFN 2816;            target >= 1.5x the loop
- deepseek: 64 experts, top-6, expert FFN 1408, 2 shared experts (2 x 1408); target >= 4x the loop
"""

import argparse
import datetime
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megalm.config import ModelConfig  # noqa: E402
from megalm.model.moe import MoELayer  # noqa: E402

SHAPES = {
    "mixtral": dict(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=2816, shared=None, target=1.5),
    "deepseek": dict(num_experts=64, moe_router_topk=6, moe_ffn_hidden_size=1408, shared=2 * 1408, target=4.0),
}


def loop_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The same layer as a Python loop over experts (plain PyTorch)."""
    tokens = x.reshape(-1, x.shape[-1])
    with torch.autocast("cuda", enabled=False):
        scores = torch.softmax(F.linear(tokens.float(), layer.router.weight), dim=-1)
    weights, indices = torch.topk(scores, layer.topk, dim=-1)
    out = torch.zeros_like(tokens, dtype=torch.bfloat16)
    for e in range(layer.num_experts):
        token_ids, slot = torch.where(indices == e)
        if token_ids.numel() == 0:
            continue
        h = tokens[token_ids] @ layer.experts.weight1[e].t()
        gate, up = h.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ layer.experts.weight2[e].t()
        out.index_add_(0, token_ids, (y * weights[token_ids, slot, None]).to(out.dtype))
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(tokens)
    return out.view_as(x)


def time_fwd_bwd(fn, x, params, warmup: int, reps: int) -> tuple:
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().mean().backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def measure(name: str, tokens: int, hidden: int, warmup: int, reps: int) -> dict:
    """Forward + backward of megalm's layer and of the loop: ms, peak GB, and their forward difference."""
    spec = SHAPES[name]
    config = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=16, swiglu=True,
                         add_bias_linear=False, num_experts=spec["num_experts"],
                         moe_router_topk=spec["moe_router_topk"], moe_ffn_hidden_size=spec["moe_ffn_hidden_size"],
                         moe_shared_expert_intermediate_size=spec["shared"])
    torch.manual_seed(0)
    layer = MoELayer(config, 0).cuda()
    x = torch.randn(1, tokens, hidden, device="cuda", requires_grad=True)
    params = list(layer.parameters())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        diff = (layer(x).float() - loop_forward(layer, x).float()).abs().max().item()
    ours, ours_mem = time_fwd_bwd(layer, x, params, warmup, reps)
    loop, loop_mem = time_fwd_bwd(lambda t: loop_forward(layer, t), x, params, warmup, reps)
    return {"megalm_ms": ours, "loop_ms": loop, "megalm_gb": ours_mem, "loop_gb": loop_mem, "diff": diff}


def bench(name: str, tokens: int, hidden: int, warmup: int, reps: int) -> str:
    spec, r = SHAPES[name], measure(name, tokens, hidden, warmup, reps)
    return (f"| {name} | {spec['num_experts']} | {spec['moe_router_topk']} | {spec['moe_ffn_hidden_size']} | "
            f"{spec['shared'] or '-'} | {r['megalm_ms']:.2f} | {r['loop_ms']:.2f} | **{r['loop_ms'] / r['megalm_ms']:.2f}x** "
            f"(target {spec['target']}x) | {r['megalm_gb']:.2f} / {r['loop_gb']:.2f} | {r['diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/bench/moe.py measures the MoE layer on a GPU and needs a CUDA device; none is visible.")
    names = args.shapes.split(",")
    for name in names:
        if name not in SHAPES:
            sys.exit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | date "
          f"{datetime.date.today()} | commit {commit} | {args.tokens} tokens, hidden {args.hidden}, bf16 autocast, "
          f"forward + backward, median of {args.reps}\n")
    print("| shape | experts | top-k | expert FFN | shared | megalm ms | loop ms | speed-up | peak GB megalm / loop "
          "| max abs diff fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        print(bench(name, args.tokens, args.hidden, args.warmup, args.reps), flush=True)


if __name__ == "__main__":
    main()
