#!/usr/bin/env python
"""FP8 training throughput: megalm's FP8 linears against its bf16 run and against torchao's float8
training of a Hugging Face Llama of the same shape, in one process.

Each variant trains a few layers of a Llama shape (embedding, N layers, output layer; AdamW, bf16
autocast, random tokens) and reports tokens/s, TFLOP/s and MFU (against the device's dense bf16
peak, as Megatron-LM and torchtitan report FP8 runs), peak memory and the ratio to the bf16 run of
the same model (megalm FP8 / megalm bf16, torchao FP8 / Hugging Face bf16). The first loss of every
variant is printed too: same seed, same weights, so FP8 and bf16 must agree closely.

    python tools/bench/fp8.py                                 # on a GPU: 1.1B- and 8B-shaped layers
    python tools/bench/fp8.py --shapes tiny --steps 1         # CPU: runs every path (its speed means nothing)
    python tools/bench/fp8.py --shapes llama-8b --variants bf16,delayed,torchao-tensorwise --compile

On CPU the FP8 GEMMs run through the fp32 reference, so only the GPU numbers say anything about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megalm.config import ModelConfig  # noqa: E402
from megalm.model import GPTModel  # noqa: E402
from megalm.model.gpt import flops_per_token  # noqa: E402
from megalm.parallel.fp8 import update_delayed_scaling  # noqa: E402
from megalm.parallel.state import ParallelState  # noqa: E402
from megalm.training.metrics import peak_flops  # noqa: E402

_LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
              untie_embeddings_and_output_weights=True, attention_dropout=0.0, hidden_dropout=0.0)
SHAPES = {  # a few layers of each model: the layers are what FP8 changes
    "llama-1b": dict(num_layers=4, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                     ffn_hidden_size=5632, seq_length=2048, padded_vocab_size=32000, micro_batch_size=4),
    "llama-8b": dict(num_layers=2, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                     ffn_hidden_size=14336, seq_length=2048, padded_vocab_size=128256, micro_batch_size=2),
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 seq_length=32, padded_vocab_size=256, micro_batch_size=2),
}
# megalm's recipes (bf16 is the baseline) and torchao's float8 recipes on the Hugging Face model.
VARIANTS = ("bf16", "tensorwise", "rowwise", "delayed", "hf-bf16", "torchao-tensorwise", "torchao-rowwise")


def _train_throughput():
    """tools/bench/train_throughput.py as a module (its model builders and timing loop)."""
    name = "megalm_bench_train_throughput"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__),
                                                                         "train_throughput.py"))
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def build(variant: str, config: ModelConfig):
    """The model of `variant` (None when its library is missing) and what runs after each step."""
    if not variant.startswith(("hf-", "torchao-")):
        fp8 = {} if variant == "bf16" else dict(fp8_format="hybrid", fp8_recipe=variant)
        model = GPTModel(dataclasses.replace(config, **fp8))
        return model, lambda: update_delayed_scaling([model], ParallelState())
    model = _train_throughput().hf_llama(config)
    if model is None or variant == "hf-bf16":
        return model, None
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None, None
    convert_to_float8_training(model.model, config=Float8LinearConfig.from_recipe_name(variant.split("-")[1]),
                               module_filter_fn=lambda module, fqn: "lm_head" not in fqn)
    return model, None


def measure_all(shape: str, variants, steps: int, warmup: int, device: torch.device, compile: bool = False) -> list:
    """One row per variant: dict(variant, tokens_per_s, tflops, mfu, memory_gb, first_loss, ratio)."""
    tt = _train_throughput()
    spec = dict(SHAPES[shape])
    mbs = spec.pop("micro_batch_size")
    config = ModelConfig(**spec, **_LLAMA)
    flops = flops_per_token(config)
    peak = peak_flops(device, torch.bfloat16)
    rows = {}
    for variant in variants:
        torch.manual_seed(0)
        model, after_step = build(variant, config)
        if model is None:
            print(f"{variant}: its library (transformers / torchao) does not import here; skipped")
            continue
        model = model.to(device)
        run = torch.compile(model) if compile else model
        r = tt.measure(run, config, mbs, steps, warmup, device, torch.bfloat16, after_step=after_step)
        r["tflops"] = flops * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] * 1e12 / peak if peak else float("nan")
        rows[variant] = dict(variant=variant, **r)
        del model, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for variant, r in rows.items():
        base = rows.get("hf-bf16" if variant.startswith(("hf-", "torchao-")) else "bf16")
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    return list(rows.values())


def table(shape: str, rows: list) -> str:
    lines = [f"| {shape} | tokens/s | TFLOP/s | MFU (bf16 peak) | peak mem (GB) | first loss | vs its bf16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if math.isfinite(r["mfu"]) else "n/a"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | "
                     f"{r['memory_gb']:.2f} | {r['first_loss']:.4f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} "
                                                       "(default: llama-1b,llama-8b on a GPU, tiny on CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 10 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 GPU, 1 CPU)")
    parser.add_argument("--compile", action="store_true", help="time the torch.compile'd models")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (args.shapes or ("llama-1b,llama-8b" if device.type == "cuda" else "tiny")).split(",")
    variants = args.variants.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown shape or variant {', '.join(unknown)}; shapes: {', '.join(SHAPES)}; "
              f"variants: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    steps = args.steps or (10 if device.type == "cuda" else 2)
    warmup = args.warmup or (3 if device.type == "cuda" else 1)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} | torch {torch.__version__}"
          f" | {'compiled' if args.compile else 'eager'} | megalm FP8: --fp8-format hybrid")
    for shape in shapes:
        print("\n" + table(shape, measure_all(shape, variants, steps, warmup, device, args.compile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
