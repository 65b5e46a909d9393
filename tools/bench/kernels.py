"""Benchmark megalm's fused kernels against their peers, in one process, on one CUDA device.

    python tools/bench/kernels.py                    # every op
    python tools/bench/kernels.py --ops attention --reps 20

For each op and shape it prints a markdown table: megalm's paths next to torch eager (the
reference), torch.compile of the reference, F.rms_norm, SDPA's flash / cuDNN / memory-efficient
backends, and Liger-Kernel or flash-attn where importable, with the median time over --reps runs
(after warm-up, timed with CUDA events), the achieved GB/s (memory-bound ops) or TFLOP/s
(attention), and each row's speed relative to megalm's default path. The fused linear +
cross-entropy table also reports peak memory. CUDA only.
"""

import argparse
import datetime
import math
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import megalm.kernels as K  # noqa: E402
from megalm.kernels import attention as attention_module  # noqa: E402
from megalm.kernels.cross_entropy import linear_cross_entropy_reference  # noqa: E402
from megalm.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from megalm.kernels.rope import apply_rotary_reference  # noqa: E402
from megalm.kernels.swiglu import swiglu_reference  # noqa: E402


def median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def with_backward(forward, inputs, grad=None):
    """A callable running forward then backward into `inputs` (grads reset each time)."""
    def step():
        for t in inputs:
            t.grad = None
        out = forward()
        out.backward(grad if grad is not None else torch.ones_like(out))
    return step


class Table:
    def __init__(self, title: str, unit: str):
        self.title, self.unit, self.rows = title, unit, []

    def add(self, name: str, fn, work: float, args, extra: str = ""):
        """work: bytes (GB/s) or FLOPs (TFLOP/s) per call."""
        try:
            ms = median_ms(fn, args.warmup, args.reps)
            rate = work / (ms * 1e-3) / (1e9 if self.unit == "GB/s" else 1e12)
            self.rows.append((name, ms, rate, extra))
        except Exception as error:  # a peer that cannot run here is reported, not fatal
            self.rows.append((name, None, None, f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:80]}"))

    def print(self):
        print(f"\n### {self.title}\n")
        print(f"| implementation | ms | {self.unit} | speed vs megalm | notes |")
        print("|---|---:|---:|---:|---|")
        base = next((ms for name, ms, _, _ in self.rows if name.startswith("megalm") and ms), None)
        for name, ms, rate, extra in self.rows:
            if ms is None:
                print(f"| {name} | - | - | - | {extra} |")
            else:
                ratio = f"{base / ms:.2f}x" if base else "-"
                print(f"| {name} | {ms:.3f} | {rate:.1f} | {ratio} | {extra} |")


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def bench_rmsnorm(args):
    n, h, dtype = 16384, 4096, torch.bfloat16
    x = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.ones(h, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    element = x.element_size()
    candidates = [("megalm triton", lambda: K.rms_norm(x, w, 1e-5, backend="triton"))]
    from megalm.kernels import _cuda
    if _cuda.extension() is not None:
        candidates.append(("megalm cuda", lambda: K.rms_norm(x, w, 1e-5, backend="cuda")))
    else:
        print(f"(megalm CUDA extension unavailable: {_cuda.unavailable_reason()})")
    reference_compiled = compiled(rms_norm_reference)
    candidates += [("torch eager (reference)", lambda: rms_norm_reference(x, w, 1e-5)),
                   ("torch.compile (reference)", lambda: reference_compiled(x, w, 1e-5)),
                   ("F.rms_norm", lambda: F.rms_norm(x, (h,), w, 1e-5))]
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        candidates.append(("Liger-Kernel", lambda: LigerRMSNormFunction.apply(x, w, 1e-5)))
    except ImportError:
        pass
    forward = Table(f"RMSNorm forward, {n} x {h} {dtype}", "GB/s")
    both = Table(f"RMSNorm forward + backward, {n} x {h} {dtype}", "GB/s")
    for name, fn in candidates:
        with torch.no_grad():
            forward.add(name, fn, 2 * n * h * element, args)
        # forward reads x, writes y; backward reads x and dy, writes dx
        both.add(name, with_backward(fn, [x, w], dy), 5 * n * h * element, args)
    forward.print()
    both.print()
    return [forward, both]


def bench_attention(args, seqs=(2048, 8192), head_dims=(128,), kv_heads=16):
    heads, tokens, dtype = 16, 16384, torch.bfloat16
    tables = []
    for seq, d in [(seq, d) for d in head_dims for seq in seqs]:
        b = tokens // seq
        q = torch.randn(b, seq, heads, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, seq, kv_heads, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        grad = torch.randn_like(q)
        flops = 4 * b * seq * seq * heads * d / 2  # causal: half the score matrix
        candidates = [("megalm triton", lambda: K.attention(q, k, v, causal=True, backend="triton")),
                      ("megalm auto", lambda: K.attention(q, k, v, causal=True, backend="auto"))]
        for label, name in [("SDPA flash", "sdpa_flash"), ("SDPA cuDNN", "sdpa_cudnn"),
                            ("SDPA mem-efficient", "sdpa_efficient")]:
            candidates.append((label, lambda name=name: attention_module._run(name, q, k, v, True, None, 0.0)))
        try:
            from flash_attn import flash_attn_func
            candidates.append(("flash-attn", lambda: flash_attn_func(q, k, v, causal=True)))
        except ImportError:
            pass
        shape = f"causal, b={b} s={seq} heads={heads} kv heads={kv_heads} d={d} {dtype}"
        forward = Table(f"Attention forward, {shape}", "TFLOP/s")
        both = Table(f"Attention forward + backward, {shape}", "TFLOP/s")
        for name, fn in candidates:
            with torch.no_grad():
                forward.add(name, fn, flops, args)
            both.add(name, with_backward(fn, [q, k, v], grad), 3.5 * flops, args)
        forward.print()
        both.print()
        tables += [forward, both]
        print(f"\n(auto chose: {sorted(set(attention_module._choice_cache.values()))})")
    return tables


def bench_linear_cross_entropy(args):
    n, h, vocab, dtype = 16384, 2048, 50304, torch.bfloat16
    hidden = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, h, device="cuda", dtype=dtype) / math.sqrt(h)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")

    def eager():
        return F.cross_entropy((hidden @ weight.t()).float(), labels)

    candidates = [("megalm fused (triton)", lambda: K.linear_cross_entropy(hidden, weight, labels, backend="triton")),
                  ("torch eager (bf16 logits, fp32 loss)", eager),
                  ("torch.compile (same)", compiled(eager)),
                  ("reference (fp32 logits)", lambda: linear_cross_entropy_reference(hidden, weight, labels))]
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        candidates.append(("Liger-Kernel fused", lambda: LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, labels)))
    except ImportError:
        pass
    table = Table(f"Linear + cross-entropy forward + backward, {n} tokens x {h} hidden x {vocab} vocab {dtype}",
                  "TFLOP/s")
    for name, fn in candidates:
        step = with_backward(fn, [hidden, weight])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            step()
            torch.cuda.synchronize()
            peak = f"peak +{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB"
        except Exception:
            peak = ""
        table.add(name, step, 3 * 2 * n * h * vocab, args, peak)  # three matmuls of 2 n h V FLOPs
    table.print()
    return [table]


def bench_rope(args):
    b, s, n_q, n_kv, d, dtype = 8, 2048, 32, 8, 128, torch.bfloat16
    qkv = torch.randn(b, s, n_q + 2 * n_kv, d, device="cuda", dtype=dtype, requires_grad=True)
    q, k = qkv[:, :, :n_q], qkv[:, :, n_q:n_q + n_kv]
    angles = torch.randn(s, d // 2, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    reference_compiled = compiled(apply_rotary_reference)
    candidates = [("megalm triton", lambda: K.apply_rotary(q, k, cos, sin, backend="triton")),
                  ("torch eager (reference)", lambda: apply_rotary_reference(q, k, cos, sin)),
                  ("torch.compile (reference)", lambda: reference_compiled(q, k, cos, sin))]
    moved = 2 * b * s * (n_q + n_kv) * d * qkv.element_size()
    forward = Table(f"RoPE forward, q {b}x{s}x{n_q}x{d}, k {n_kv} heads, strided views, {dtype}", "GB/s")
    both = Table(f"RoPE forward + backward, same shapes, {dtype}", "GB/s")
    for name, fn in candidates:
        with torch.no_grad():
            forward.add(name, fn, moved, args)
        both.add(name, with_backward(lambda fn=fn: sum(t.sum() for t in fn()), [qkv]), 2 * moved, args)
    forward.print()
    both.print()


def bench_swiglu(args):
    n, f, dtype = 16384, 11008, torch.bfloat16
    x = torch.randn(n, 2 * f, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(n, f, device="cuda", dtype=dtype)
    reference_compiled = compiled(swiglu_reference)
    candidates = [("megalm triton", lambda: K.swiglu(x, backend="triton")),
                  ("torch eager (reference)", lambda: swiglu_reference(x)),
                  ("torch.compile (reference)", lambda: reference_compiled(x))]
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        candidates.append(("Liger-Kernel", lambda: LigerSiLUMulFunction.apply(x[:, :f], x[:, f:])))
    except ImportError:
        pass
    element = x.element_size()
    forward = Table(f"SwiGLU forward, {n} x 2*{f} {dtype}", "GB/s")
    both = Table(f"SwiGLU forward + backward, {n} x 2*{f} {dtype}", "GB/s")
    for name, fn in candidates:
        with torch.no_grad():
            forward.add(name, fn, 3 * n * f * element, args)
        # forward 2f in + f out; backward 2f + f in, 2f out
        both.add(name, with_backward(fn, [x], dy), 8 * n * f * element, args)
    forward.print()
    both.print()


OPS = {"rmsnorm": bench_rmsnorm, "attention": bench_attention, "linear_cross_entropy": bench_linear_cross_entropy,
       "rope": bench_rope, "swiglu": bench_swiglu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/bench/kernels.py measures GPU kernels and needs a CUDA device; none is visible.")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import triton
    print(f"## megalm kernels vs peers\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {datetime.date.today()}, commit {commit}, "
          f"median of {args.reps} after {args.warmup} warm-up\n\ncommand: python {' '.join(sys.argv)}")
    for name in args.ops.split(","):
        if name not in OPS:
            sys.exit(f"unknown op {name!r}; choose from {', '.join(OPS)}")
        OPS[name](args)


if __name__ == "__main__":
    main()
