#!/usr/bin/env python
"""Weight-only quantization: size, time to quantize and decoding speed against the unquantized model.

The model is random (Llama-shaped, tools/bench/generate.py's presets); GPTQ calibrates on random
tokens. Accuracy is measured on real text by `tools/evaluate.py --quantize` and by
tests/test_quantize.py, not here. `QuantizedLinear` dequantizes its weight at every call (the
reference path), so on its own it trades speed for memory; the table says by how much.

    python tools/bench/quantize.py
    python tools/bench/quantize.py --device cuda --dtype bf16 --new-tokens 128
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megalm.config import ModelConfig  # noqa: E402
from megalm.inference import quantize  # noqa: E402
from megalm.inference.generate import SamplingParams, generate  # noqa: E402
from megalm.model import GPTModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import PRESETS, timed  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-small", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    length = args.prompt_tokens + args.new_tokens
    config = ModelConfig(**PRESETS[args.preset], seq_length=max(length, 128), padded_vocab_size=args.vocab_size,
                         attention_dropout=0.0, hidden_dropout=0.0)
    base = GPTModel(config).to(args.device).eval()
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_tokens)).tolist()
    calibration = [torch.randint(0, args.vocab_size, (1, 128)) for _ in range(args.calibration_samples)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    print(f"device {args.device}, activations {dtype}, preset {args.preset} "
          f"({base.num_parameters() / 1e6:.1f}M parameters), decode {args.new_tokens} tokens after "
          f"{args.prompt_tokens}, torch {torch.__version__}")
    print("| weights | transformer layers MB | whole model MB | quantize s | decode tokens/s | vs fp32 |")
    print("|---|---|---|---|---|---|")
    reference = None
    for method in ("fp32", *quantize.METHODS):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if method != "fp32":
            quantize.quantize_model(model, method, calibration if method == "gptq-int4" else None)
        seconds = time.perf_counter() - start
        model.to(dtype=dtype)
        with torch.no_grad():
            t, _ = timed(lambda: generate(model, prompt, params), args.repeats)
        speed = args.new_tokens / t
        reference = reference or speed
        print(f"| {method} | {quantize.model_bytes(model, exclude_embeddings=True) / 1e6:.1f} | "
              f"{quantize.model_bytes(model) / 1e6:.1f} | {seconds:.1f} | {speed:.1f} | {speed / reference:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
