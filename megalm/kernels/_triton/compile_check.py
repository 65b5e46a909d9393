"""Compile every Triton kernel for a GPU architecture on a machine without one.

The CPU tests run the kernels through Triton's interpreter, which takes other block sizes and no
bfloat16, so a kernel can pass them all and still fail to compile on a GPU (shared memory, a
`tl.dot` shape, a dtype). Here the kernels go through their real launch functions, with the GPU
configurations those pick (autotuner configs included), while Triton's active driver is
`CompileOnlyDriver`: it reports an sm_80 or sm_90 target, compiles with the ptxas Triton ships,
checks each kernel's shared memory against the architecture's limit exactly as a launch would, and
launches nothing. The inputs are CPU tensors (the kernels never read them); only their dtypes,
strides and alignment matter, as they do for Triton's specialization on a GPU.

    python -m megalm.kernels._triton.compile_check --arch 90 [--only attention] [--full] [--json report.json]

Every compiled kernel is reported with its constexprs, warps, stages, shared memory (`shared` in
the compiled metadata), registers and spills (local memory / 4, what Triton calls n_spills), and
every config an autotuner pruned before compiling, with the reason. Must run with TRITON_INTERPRET
unset: the interpreter replaces the compiler. Each architecture needs a process of its own (Triton
binds a kernel's compile target once per process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

ARCHS = (90, 80)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- representative shapes -------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    experts: int = 0
    topk: int = 0


MODELS = {
    "gpt2-124m": Shape(hidden=768, heads=12, kv_heads=12, head_dim=64, ffn=3072, vocab=50257),
    "llama-1b": Shape(hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, vocab=128256),
    "llama-8b": Shape(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256),
    "gqa-d256": Shape(hidden=4096, heads=16, kv_heads=8, head_dim=256, ffn=16384, vocab=256000),
    "deepseek-moe-16b": Shape(hidden=2048, heads=16, kv_heads=16, head_dim=128, ffn=1408, vocab=102400,
                              experts=64, topk=6),
    "mixtral-8x7b": Shape(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=32000, experts=8,
                          topk=2),
}
TOKENS = 1024   # rows of the token-wise kernels (a multiple of 16, as in training)
SEQ = 512       # attention sequence length; the kernels specialize on s % 16, not on its size


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


def _norm(shape: Shape, dtype):
    from megalm.kernels._triton.norm import norm_backward, norm_forward
    rms = shape is not MODELS["gpt2-124m"]  # GPT-2 uses LayerNorm with a bias, the others RMSNorm
    x, w = _empty(TOKENS, shape.hidden, dtype=dtype), _empty(shape.hidden, dtype=dtype)
    bias = None if rms else _empty(shape.hidden, dtype=dtype)
    _, mean, rstd = norm_forward(x, w, bias, 1e-5, rms)
    norm_backward(torch.empty_like(x), x, w, mean, rstd, rms, bias is not None)


def _rope(shape: Shape, dtype):
    from megalm.kernels._triton.rope import rotary
    qkv = _empty(1, SEQ, shape.heads + 2 * shape.kv_heads, shape.head_dim, dtype=dtype)  # a fused qkv output
    q, k = qkv[:, :, :shape.heads], qkv[:, :, shape.heads:shape.heads + shape.kv_heads]
    cos = sin = torch.empty(SEQ, shape.head_dim // 2, dtype=torch.float32)
    for inverse in (False, True):
        rotary(q, k, cos, sin, inverse)


def _swiglu(shape: Shape, dtype):
    from megalm.kernels._triton.swiglu import swiglu_backward, swiglu_forward
    x = _empty(TOKENS, 2 * shape.ffn, dtype=dtype)
    swiglu_forward(x)
    swiglu_backward(_empty(TOKENS, shape.ffn, dtype=dtype), x)


def _cross_entropy(shape: Shape, dtype):
    from megalm.kernels._triton.cross_entropy import cross_entropy_forward, linear_cross_entropy_forward
    labels = torch.zeros(16, dtype=torch.int64)
    cross_entropy_forward(_empty(16, shape.vocab, dtype=dtype), labels, -100, 1e-4, "mean", True)
    # one token: a single chunk (the CPU matmul before the kernel is the slow part here)
    hidden, weight = torch.zeros(1, shape.hidden, dtype=dtype), torch.zeros(shape.vocab, shape.hidden, dtype=dtype)
    linear_cross_entropy_forward(hidden, weight, labels[:1], -100, 0.0, "mean", True, True)


def _moe_router(shape: Shape, dtype):
    from megalm.kernels._triton.moe_router import router_backward, router_forward
    logits = _empty(TOKENS, shape.experts, dtype=dtype)  # router logits are fp32
    for sigmoid, bias in ((False, None), (True, torch.zeros(shape.experts))):
        weights, indices, scores = router_forward(logits, shape.topk, sigmoid, True, 1.0, bias)
        router_backward(logits, indices, torch.empty_like(weights), torch.empty_like(scores), sigmoid, True, 1.0)


def _moe_permute(shape: Shape, dtype):
    from megalm.kernels._triton.moe_permute import gather, scatter
    x = _empty(TOKENS, shape.hidden, dtype=dtype)
    rows = torch.arange(TOKENS * shape.topk).view(TOKENS, shape.topk)
    weights = torch.empty(TOKENS, shape.topk, dtype=torch.float32)
    y, _ = scatter(x, rows, None, TOKENS * shape.topk, False, None)   # permute
    gather(y, rows, weights)                                        # unpermute
    scatter(x, rows, weights, TOKENS * shape.topk, False, y)        # unpermute's backward, with d weights


def _grouped_gemm(shape: Shape, dtype):
    from megalm.kernels._triton.grouped_gemm import grouped_gemm, grouped_gemm_weight_grad
    rows = TOKENS * shape.topk
    counts = torch.full((shape.experts,), rows // shape.experts, dtype=torch.int64)
    x = _empty(rows, shape.hidden, dtype=dtype)
    w_up = _empty(shape.experts, 2 * shape.ffn, shape.hidden, dtype=dtype)      # [E, n, k]: x @ w[e]^T
    w_down = _empty(shape.experts, shape.ffn, shape.hidden, dtype=dtype)        # [E, k, n]: h @ w[e]
    h = grouped_gemm(x, w_up, counts, False)[:, :shape.ffn]
    grouped_gemm(h.contiguous(), w_down, counts, True)
    grouped_gemm_weight_grad(_empty(rows, 2 * shape.ffn, dtype=dtype), x, counts)


def _attention(shape: Shape, dtype, packed: bool = False):
    from megalm.kernels.attention import attention_triton
    q = _empty(1, SEQ, shape.heads, shape.head_dim, dtype=dtype).requires_grad_()
    k, v = (_empty(1, SEQ, shape.kv_heads, shape.head_dim, dtype=dtype).requires_grad_() for _ in range(2))
    # packed: two documents in the sequence (the kernels' document-mask variant)
    documents = (torch.arange(SEQ) >= SEQ // 2).to(torch.int64)[None] if packed else None
    out = attention_triton(q, k, v, causal=True, document_ids=documents)
    out.backward(torch.empty_like(out))


def _attention_packed(shape: Shape, dtype):
    _attention(shape, dtype, packed=True)


@dataclass(frozen=True)
class Case:
    kernel: str
    model: str
    dtype: str
    run: Callable = field(compare=False, repr=False)
    archs: tuple[int, ...] = ARCHS  # where the default (quick) check compiles it; --full: everywhere

    @property
    def name(self) -> str:
        return f"{self.kernel}-{self.model}-{self.dtype}"


def _cases(kernel, run, models, dtypes=("bf16", "fp16"), archs=ARCHS):
    return [Case(kernel, model, dtype, run, archs) for model in models for dtype in dtypes]


_QUICK_ATTENTION = {("attention", "llama-8b", "bf16"): (90,), ("attention_packed", "llama-1b", "bf16"): (90,),
                    ("attention", "gqa-d256", "bf16"): (80,), ("attention", "gpt2-124m", "fp16"): (80,)}
# Cheap kernels first, attention (a few seconds per autotuner config, 19 configs per shape) last.
# The quick check spreads the attention shapes over the two architectures: sm_90 gets d 128, and
# d 64 over packed documents, grouped in bf16; sm_80 (the smaller shared memory) d 256 in bf16 and
# d 64 ungrouped in fp16. --full compiles every attention shape on both, in bf16 and fp16.
CASES = (
    _cases("norm", _norm, ("gpt2-124m", "llama-8b"))
    + _cases("rope", _rope, ("llama-1b", "llama-8b"))
    + _cases("swiglu", _swiglu, ("llama-8b",))
    + _cases("cross_entropy", _cross_entropy, ("gpt2-124m", "llama-8b"))
    + _cases("moe_router", _moe_router, ("deepseek-moe-16b", "mixtral-8x7b"), ("fp32",))
    + _cases("moe_permute", _moe_permute, ("deepseek-moe-16b", "mixtral-8x7b"))
    + _cases("grouped_gemm", _grouped_gemm, ("deepseek-moe-16b", "mixtral-8x7b"))
    + [Case(kernel, model, dtype, run, _QUICK_ATTENTION.get((kernel, model, dtype), ()))
       for kernel, run, models in (("attention", _attention, ("llama-8b", "llama-1b", "gqa-d256", "gpt2-124m")),
                                   ("attention_packed", _attention_packed, ("llama-1b", "llama-8b")))
       for dtype in ("bf16", "fp16") for model in models]
)


def cases_for(arch: int, full: bool = False) -> list[Case]:
    return [case for case in CASES if full or arch in case.archs]


# ---- the compile-only driver -------------------------------------------------------------------

@dataclass
class Compiled:
    case: str
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int
    limit: int
    n_regs: int = -1
    n_spills: int = -1

    @property
    def fits(self) -> bool:
        return self.shared <= self.limit


def _resource_usage(name: str, cubin: bytes) -> tuple[int, int]:
    """(registers, spills) of `name` in `cubin`, from cuobjdump (spills = local memory / 4, as
    Triton counts them on a GPU); (-1, -1) when cuobjdump is unavailable."""
    import triton
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
    except (AttributeError, RuntimeError):
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    match = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if match is None:
        return -1, -1
    regs, stack, local = map(int, match.groups())
    return regs, (stack + local) // 4


class _Utils:
    def __init__(self, owner: "CompileOnlyDriver"):
        self.owner = owner

    def get_device_properties(self, device):
        from megalm.kernels._triton.configs import shared_memory_limit
        return {"max_shared_mem": shared_memory_limit(self.owner.arch), "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1_755_000, "mem_clock_rate": 2_619_000,
                "mem_bus_width": 5120}

    def load_binary(self, name, cubin, shared, device):
        regs, spills = _resource_usage(name, cubin)
        record = self.owner.compiled[-1]
        record.n_regs, record.n_spills = regs, spills
        return 1, 1, max(regs, 0), max(spills, 0), 1024  # module, function, regs, spills, max threads

    def unload_module(self, module):
        return None


class CompileOnlyDriver:
    """Triton's active driver for compiling without a GPU: the target is `arch`, a launch records
    the compiled kernel and does nothing, autotuners compile every config they keep."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _Utils(self)
        self.compiled: list[Compiled] = []
        self.launched: list[dict] = []  # one entry per (case, kernel) that launched
        self.case = ""
        self._bench_calls = 0

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        return None

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()  # compiles the config (and raises OutOfResources when it does not fit)
            self._bench_calls += 1  # a made-up, increasing time: the first config that fits wins
            return [float(self._bench_calls)] * (len(quantiles) if quantiles else 1)
        return bench

    def launcher_cls(self, src, metadata):
        names = src.fn.arg_names
        constexprs = {(names[key[0]] if isinstance(key, tuple) else key): value
                      for key, value in src.constants.items()}
        self.compiled.append(Compiled(self.case, metadata.name, {k: _plain(v) for k, v in constexprs.items()},
                                      metadata.num_warps, metadata.num_stages, metadata.shared,
                                      self.utils.get_device_properties(0)["max_shared_mem"]))

        def launch(*args, **kwargs):
            entry = {"case": self.case, "kernel": metadata.name}
            if entry not in self.launched:
                self.launched.append(entry)
        return launch


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


class _PruneLog(logging.Handler):
    def __init__(self, driver: CompileOnlyDriver):
        super().__init__(logging.DEBUG)
        self.driver = driver
        self.pruned: list[dict] = []

    def emit(self, record):
        if hasattr(record, "pruned"):
            kernel, config, reason = record.pruned
            self.pruned.append({"case": self.driver.case, "kernel": kernel, "config": config, "reason": reason})


def autotuners_without_prune() -> list[str]:
    """Kernels (by name) of the loaded autotuners that have no early prune, so whose configs over the
    shared-memory limit are compiled before a launch refuses them."""
    from triton.runtime.autotuner import Autotuner
    names = set()
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("megalm.kernels._triton."):
            for value in vars(module).values():
                if isinstance(value, Autotuner) and not value.early_config_prune:
                    names.add(getattr(value, "base_fn", value.fn).__name__)
    return sorted(names)


def run(arch: int, only: tuple[str, ...] = (), full: bool = False) -> dict:
    """Compile the cases for `arch` (those whose kernel is in `only`, if given); -> the report dict."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: TRITON_INTERPRET is set, which replaces Triton's compiler with its "
                           "interpreter; unset it (env -u TRITON_INTERPRET ...)")
    import triton
    from triton.runtime.driver import driver as active
    fake = CompileOnlyDriver(arch)
    log = _PruneLog(fake)
    logger = logging.getLogger("megalm.kernels")
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    previous = getattr(active, "_active", None)  # None where no GPU driver was ever made active
    active.set_active(fake)
    cases = []
    try:
        for case in cases_for(arch, full):
            if only and case.kernel not in only:
                continue
            fake.case = case.name
            start, error = time.perf_counter(), None
            try:
                case.run(MODELS[case.model], DTYPES[case.dtype])
            except Exception as exc:  # reported per case: one kernel failing must not hide the others
                error = f"{type(exc).__name__}: {exc}"
            cases.append({"case": case.name, "kernel": case.kernel, "error": error,
                          "seconds": round(time.perf_counter() - start, 2)})
    finally:
        active.set_active(previous)
        logger.removeHandler(log)
    compiled = [dict(asdict(c), fits=c.fits) for c in fake.compiled]
    return {"arch": arch, "triton": triton.__version__, "cases": cases, "compiled": compiled, "pruned": log.pruned,
            "launched": fake.launched, "unpruned_autotuners": autotuners_without_prune()}


def format_report(report: dict) -> str:
    """One line per compiled kernel: shared memory against the limit, registers, spills."""
    lines = [f"sm_{report['arch']} (triton {report['triton']}): {len(report['compiled'])} kernels compiled, "
             f"{len(report['pruned'])} configs pruned"]
    for c in report["compiled"]:
        blocks = " ".join(f"{k}={v}" for k, v in c["constexprs"].items() if k.startswith("BLOCK"))
        flag = "" if c["fits"] else "  OVER THE SHARED-MEMORY LIMIT"
        spills = f"  spills {c['n_spills']}" if c["n_spills"] else ""
        lines.append(f"  {c['case']:<36} {c['kernel']:<34} {blocks:<40} w{c['num_warps']} s{c['num_stages']} "
                     f"smem {c['shared'] // 1024:>3}/{c['limit'] // 1024} KB  regs {c['n_regs']}{spills}{flag}")
    for p in report["pruned"]:
        lines.append(f"  {p['case']:<36} {p['kernel']:<34} pruned {p['config']}: {p['reason']}")
    for case in report["cases"]:
        if case["error"]:
            lines.append(f"  {case['case']}: FAILED {case['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, default=90, help="compute capability to compile for")
    parser.add_argument("--only", nargs="*", default=(), help="kernels to compile (default: all)")
    parser.add_argument("--full", action="store_true", help="every attention shape and dtype (slow)")
    parser.add_argument("--json", help="write the report here as JSON")
    args = parser.parse_args(argv)
    try:
        report = run(args.arch, tuple(args.only), args.full)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)
    print(format_report(report))
    return 1 if any(case["error"] for case in report["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
