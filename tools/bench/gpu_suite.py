#!/usr/bin/env python
"""Measure everything a GPU can tell us, in one command, within a time budget.

    python tools/bench/gpu_suite.py                    # on a CUDA machine, at most --budget-s (550) seconds
    python tools/bench/gpu_suite.py --dry-run          # list the steps and their estimated time (any machine)
    python tools/bench/gpu_suite.py --only attention,moe --budget-s 300

In order: build the CUDA extension; run `pytest -m gpu` with a short time limit; then every GPU
benchmark beside its peer in the same process, reusing the scripts of tools/bench/ as functions:
RMSNorm (F.rms_norm, torch.compile, Liger), attention (SDPA flash and cuDNN; S 2048 / 8192, head dim
64 / 128, causal, grouped-query), fused linear + cross-entropy (time and peak memory against eager
and Liger), MoE (8 experts top-2 and 64 experts top-6 against a loop over experts), training
(GPT-2 124M against a compiled nanoGPT-style model, Llama 1.1B against Hugging Face) and generation
(against Hugging Face `generate`), FP8 training (megalm's recipes against bf16 and torchao's float8, Llama
1.1B- and 8B-shaped layers). A step whose estimate no longer fits the budget is skipped, and
a step still running when the budget ends is stopped; both are said so in the results.

Writes <out>/gpu_suite.json and <out>/gpu_suite.md: device, torch / triton versions, commit, date,
every ratio, and each target of docs/BENCHMARKS.md (kernels, MoE, training) as pass / short.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


@dataclass
class Result:
    """One measured comparison: `value` of megalm against `peer` (a ratio > 1 favours megalm unless the
    unit says otherwise), and the target it is held to, if docs/BENCHMARKS.md states one."""
    step: str
    what: str
    value: float
    unit: str = "x"
    target: Optional[float] = None   # pass when value >= target (or <= for "at most" targets)
    at_most: bool = False

    @property
    def verdict(self) -> str:
        if self.target is None or not math.isfinite(self.value):
            return "-"
        ok = self.value <= self.target if self.at_most else self.value >= self.target
        return "pass" if ok else "short"

    def row(self) -> dict:
        value = self.value if math.isfinite(self.value) else None  # JSON has no NaN
        return {"step": self.step, "what": self.what, "value": value, "unit": self.unit,
                "target": self.target, "at_most": self.at_most, "verdict": self.verdict}


class BudgetExceeded(Exception):
    pass


# ---- the steps --------------------------------------------------------------------------------

def _script(name: str):
    """tools/bench/<name>.py as a module (its functions, without running its main)."""
    module_name = f"megalm_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _bench_args(reps: int):
    return argparse.Namespace(warmup=3, reps=reps)


def _ms(table, name: str) -> float:
    return next((ms for row_name, ms, _, _ in table.rows if row_name == name and ms), float("nan"))


def _ratios(step: str, table, ours: str, peers: list[str], label: str, targets: dict = None) -> list[Result]:
    """Speed of `ours` against each peer row of a tools/bench/kernels.py Table (peer ms / our ms)."""
    mine = _ms(table, ours)
    return [Result(step, f"{label}: {ours} vs {peer}", _ms(table, peer) / mine, target=(targets or {}).get(peer))
            for peer in peers if any(r[0] == peer for r in table.rows)]


def build_extension(args) -> list[Result]:
    from megalm.kernels import _cuda
    start = time.perf_counter()
    module = _cuda.extension()
    if module is None:
        raise RuntimeError(f"the CUDA extension is unavailable: {_cuda.unavailable_reason()}")
    return [Result("cuda-extension", "build / load time", time.perf_counter() - start, unit="s")]


def gpu_tests(args, limit_s: float) -> list[Result]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, limit_s - 5))
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    print(proc.stdout[-3000:])
    return [Result("pytest -m gpu", f"failed tests ({summary})", failed, unit="tests", target=0, at_most=True)]


def rmsnorm(args) -> list[Result]:
    kernels = _script("kernels")
    forward, both = kernels.bench_rmsnorm(_bench_args(args.reps))
    peers = ["F.rms_norm", "torch.compile (reference)", "Liger-Kernel"]
    ours = "megalm triton"
    bandwidth = next((rate for name, ms, rate, _ in forward.rows if name == ours and ms), float("nan"))
    return ([Result("rmsnorm", "forward 16384 x 4096 bf16, megalm triton", bandwidth, unit="GB/s", target=2800)]
            + _ratios("rmsnorm", forward, ours, peers, "forward")
            + _ratios("rmsnorm", both, ours, peers, "forward + backward"))


def attention(args) -> list[Result]:
    kernels = _script("kernels")
    tables = kernels.bench_attention(_bench_args(args.reps), seqs=(2048, 8192), head_dims=(64, 128), kv_heads=4)
    results = []
    for table in tables:
        fwd = table.title.startswith("Attention forward,")
        d128 = "d=128" in table.title
        target = {"SDPA flash": (1.5 if fwd else 1.3)} if d128 else {}
        results += _ratios("attention", table, "megalm triton", ["SDPA flash", "SDPA cuDNN"],
                           table.title.replace("Attention ", ""), target)
    return results


def linear_cross_entropy(args) -> list[Result]:
    kernels = _script("kernels")
    (table,) = kernels.bench_linear_cross_entropy(_bench_args(args.reps))
    ours, eager = "megalm fused (triton)", "torch eager (bf16 logits, fp32 loss)"

    def peak(name):
        extra = next((e for n, _, _, e in table.rows if n == name), "")
        match = re.search(r"peak \+([\d.]+) GiB", extra)
        return float(match.group(1)) if match else float("nan")
    results = _ratios("linear+ce", table, ours, [eager, "torch.compile (same)", "Liger-Kernel fused"],
                      "forward + backward", {eager: 1.0})
    results.append(Result("linear+ce", f"peak memory, {ours} / {eager}", peak(ours) / peak(eager), target=1 / 8,
                          at_most=True))
    if not math.isnan(peak("Liger-Kernel fused")):
        results.append(Result("linear+ce", f"peak memory, {ours} / Liger-Kernel fused",
                              peak(ours) / peak("Liger-Kernel fused")))
    return results


def moe(args) -> list[Result]:
    moe_bench = _script("moe")
    results = []
    for name in ("mixtral", "deepseek"):
        spec = moe_bench.SHAPES[name]
        r = moe_bench.measure(name, 16384, 2048, 3, args.reps)
        results.append(Result("moe", f"{spec['num_experts']} experts top-{spec['moe_router_topk']}: megalm vs "
                                     f"per-expert loop (fwd + bwd)", r["loop_ms"] / r["megalm_ms"],
                              target=spec["target"]))
    return results


def _train(preset: str, peer: str, modes: tuple[str, ...], steps: int) -> dict:
    """tokens/s of megalm and `peer` for each mode, via tools/bench/train_throughput.py's functions."""
    tt = _script("train_throughput")
    from megalm.config import ModelConfig
    from megalm.model import GPTModel
    spec = dict(tt.PRESETS[preset])
    mbs = spec.pop("micro_batch_size")
    config = ModelConfig(attention_dropout=0.0, hidden_dropout=0.0, **spec)
    out = {}
    for mode in modes:
        for name in ("megalm", peer):
            torch.manual_seed(0)
            model = GPTModel(config) if name == "megalm" else tt.NanoGPT(config) if peer == "nanogpt" \
                else tt.hf_llama(config)
            if model is None:
                raise RuntimeError("transformers is not installed: no Hugging Face peer")
            model = model.cuda()
            run = torch.compile(model) if mode == "compile" else model
            out[(mode, name)] = tt.measure(run, config, mbs, steps, 3, torch.device("cuda"),
                                           torch.bfloat16)["tokens_per_s"]
            del model, run
            torch.cuda.empty_cache()
    return out


def train_gpt2(args) -> list[Result]:
    t = _train("gpt2-124m", "nanogpt", ("compile",), steps=10)
    ratio = t[("compile", "megalm")] / t[("compile", "nanogpt")]
    return [Result("train gpt2-124m", "megalm compiled vs compiled nanoGPT (tokens/s)", ratio, target=1.25),
            Result("train gpt2-124m", "megalm compiled tokens/s", t[("compile", "megalm")], unit="tokens/s")]


def train_llama(args) -> list[Result]:
    t = _train("llama-1b", "hf-llama", ("eager",), steps=5)
    return [Result("train llama-1.1b", "megalm vs HF transformers (tokens/s)",
                   t[("eager", "megalm")] / t[("eager", "hf-llama")], target=1.6)]


def fp8(args) -> list[Result]:
    bench = _script("fp8")
    results = []
    for shape in ("llama-1b", "llama-8b"):
        rows = {r["variant"]: r for r in bench.measure_all(
            shape, ("bf16", "tensorwise", "delayed", "hf-bf16", "torchao-tensorwise"), steps=5, warmup=2,
            device=torch.device("cuda"))}
        for recipe in ("tensorwise", "delayed"):
            results.append(Result(f"fp8 {shape}", f"megalm FP8 {recipe} vs megalm bf16 (tokens/s)",
                                  rows[recipe]["ratio"], target=1.3 if shape == "llama-8b" else None))
            if "torchao-tensorwise" in rows:
                results.append(Result(f"fp8 {shape}", f"megalm FP8 {recipe} vs torchao float8 tensorwise (tokens/s)",
                                      rows[recipe]["tokens_per_s"] / rows["torchao-tensorwise"]["tokens_per_s"]))
        if "torchao-tensorwise" in rows:
            results.append(Result(f"fp8 {shape}", "torchao float8 tensorwise vs HF bf16 (tokens/s)",
                                  rows["torchao-tensorwise"]["ratio"]))
        results += [Result(f"fp8 {shape}", f"MFU of megalm {name} (bf16 peak)", 100 * rows[name]["mfu"], unit="%")
                    for name in ("bf16", "tensorwise", "delayed")]
    return results


def generation(args) -> list[Result]:
    gen = _script("generate")
    rows = gen.compare(gen.parse_args(["--device", "cuda", "--dtype", "bf16", "--batch-sizes", "1", "8",
                                       "--new-tokens", "128", "--repeats", "2"]))
    return [Result("generation", f"batch {r['batch']}: megalm vs HF generate (tokens/s)"
                   f"{'' if r['same_tokens'] else ', DIFFERENT TOKENS'}",
                   r["megalm_tokens_per_s"] / r["hf_tokens_per_s"]) for r in rows]


@dataclass
class Step:
    name: str
    estimate_s: int
    run: Callable
    what: str


STEPS = [
    Step("cuda-extension", 75, build_extension, "JIT-build (or load) the CUDA extension for this GPU"),
    Step("gpu-tests", 45, gpu_tests, "pytest -m gpu, stopped at its share of the budget"),
    Step("rmsnorm", 20, rmsnorm, "RMSNorm fwd, fwd+bwd vs F.rms_norm, torch.compile, Liger"),
    Step("attention", 110, attention, "attention fwd, fwd+bwd vs SDPA flash / cuDNN, S 2048/8192, D 64/128, GQA"),
    Step("linear-ce", 25, linear_cross_entropy, "fused linear+CE time and peak memory vs eager, compile, Liger"),
    Step("moe", 35, moe, "MoE layer 8x top-2 and 64x top-6 vs a per-expert loop"),
    Step("train-gpt2", 85, train_gpt2, "GPT-2 124M training, compiled, vs compiled nanoGPT-style model"),
    Step("train-llama", 55, train_llama, "Llama 1.1B training vs HF transformers LlamaForCausalLM"),
    Step("generation", 25, generation, "KV-cache generation tokens/s vs HF generate"),
    Step("fp8", 70, fp8, "FP8 vs bf16 training tokens/s and MFU, Llama 1.1B- / 8B-shaped layers, vs torchao float8"),
]


# ---- running within the budget -----------------------------------------------------------------

@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise BudgetExceeded in the main thread once `seconds` have passed."""
    def expire(signum, frame):
        raise BudgetExceeded()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_steps(steps: list[Step], args) -> tuple[list[Result], list[dict]]:
    start = time.monotonic()
    results, log = [], []
    for step in steps:
        left = args.budget_s - (time.monotonic() - start)
        if step.estimate_s > left:
            log.append({"step": step.name, "status": f"skipped: needs ~{step.estimate_s} s, {left:.0f} s left"})
            continue
        print(f"== {step.name}: {step.what} (~{step.estimate_s} s)", flush=True)
        t0 = time.monotonic()
        try:
            with _deadline(left):
                out = step.run(args, min(step.estimate_s, left)) if step.name == "gpu-tests" else step.run(args)
            results += out
            status = "ok"
        except BudgetExceeded:
            status = "stopped: the time budget ran out"
        except subprocess.TimeoutExpired:
            status = "stopped: the time budget ran out"
        except Exception as error:  # one failing benchmark must not lose the others' results
            status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        log.append({"step": step.name, "status": status, "seconds": round(time.monotonic() - t0, 1)})
        print(f"== {step.name}: {status}", flush=True)
    return results, log


def environment() -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(env: dict, results: list[Result], log: list[dict], command: str) -> str:
    lines = [f"## GPU suite: {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, commit {env['commit']}, "
             f"{env['date']}; `{command}`", "",
             "| step | comparison | value | target | verdict |", "|---|---|---:|---|---|"]
    for r in results:
        unit = r.unit if r.unit == "x" else f" {r.unit}"
        value = f"{r.value:.2f}x" if r.unit == "x" else f"{r.value:,.1f}{unit}"
        target = "-" if r.target is None else f"{'<=' if r.at_most else '>='} {r.target:g}{unit}"
        lines.append(f"| {r.step} | {r.what} | {value} | {target} | {r.verdict} |")
    lines += ["", "| step | status |", "|---|---|"] + [f"| {e['step']} | {e['status']} |" for e in log]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--budget-s", type=float, default=550, help="stop after this many seconds (default 550)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their estimated time, run nothing")
    parser.add_argument("--only", default=None, help=f"comma list of steps ({', '.join(s.name for s in STEPS)})")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per kernel measurement")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_suite"),
                        help="directory for gpu_suite.json / .md (default runs/gpu_suite)")
    return parser.parse_args(argv)


def select(only: Optional[str]) -> list[Step]:
    if only is None:
        return list(STEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in {s.name for s in STEPS}]
    if unknown:
        raise ValueError(f"--only: unknown step {', '.join(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    return [s for s in STEPS if s.name in names]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        steps = select(args.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        total = 0
        for step in steps:
            total += step.estimate_s
            print(f"{step.name:<16} {'~' + str(step.estimate_s) + 's':>6}  {step.what}")
        fits = "fits" if total <= args.budget_s else "does not fit; the last steps will be skipped"
        print(f"{'total':<16} {'~' + str(total) + 's':>6}  (budget {args.budget_s:g} s: {fits})")
        return 0
    if not torch.cuda.is_available():
        print(f"error: tools/bench/gpu_suite.py needs a CUDA GPU and none is visible (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda or 'not built in'}); run it on a GPU machine, or pass --dry-run to list "
              "what it would measure", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    env = environment()
    results, log = run_steps(steps, args)
    command = "python tools/bench/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(
        {"environment": env, "command": command, "budget_s": args.budget_s, "steps": log,
         "results": [r.row() for r in results]}, indent=1))
    text = markdown(env, results, log, command)
    (out / "gpu_suite.md").write_text(text)
    print("\n" + text + f"\nwritten: {out / 'gpu_suite.json'}, {out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
