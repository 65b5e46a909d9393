#!/usr/bin/env python
"""Generation speed: megalm's KV-cache decoding against Hugging Face `generate`, same weights, same process.

A random-weight megalm model is exported to a Hugging Face directory (tools/convert_checkpoint.py's
code) and loaded with `AutoModelForCausalLM`; both decode greedily from the same random prompts
(batch of equal-length prompts, no stop token) and the table gives new tokens per second, the
ratio megalm / HF, and whether the two produced the same tokens. Median of --repeats runs after one
warm-up run.

    python tools/bench/generate.py                                   # Llama-shaped, CPU-sized
    python tools/bench/generate.py --batch-sizes 1 8 --new-tokens 256 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megalm.checkpoint import save_checkpoint  # noqa: E402
from megalm.config import Config, ModelConfig  # noqa: E402
from megalm.convert import megalm_to_hf  # noqa: E402
from megalm.inference.generate import SamplingParams, generate  # noqa: E402
from megalm.model import GPTModel  # noqa: E402

PRESETS = {
    # A Llama-style shape small enough for a CPU: GQA, SwiGLU, RMSNorm, RoPE, untied head.
    "llama-small": dict(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=1408, position_embedding_type="rope", normalization="RMSNorm",
                        swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True),
    "gpt2-small": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-small", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    return parser.parse_args(argv)


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def compare(args) -> list[dict]:
    """Decode with megalm and with HF generate for each batch size; prints the table, returns its rows."""
    import transformers
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") \
        else torch.float32
    torch.manual_seed(0)
    max_positions = args.prompt_tokens + args.new_tokens
    config = Config(model=ModelConfig(**PRESETS[args.preset], seq_length=max_positions,
                                      max_position_embeddings=max_positions, padded_vocab_size=args.vocab_size,
                                      attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.05))
    config.data.vocab_size = args.vocab_size
    model = GPTModel(config.model)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(os.path.join(tmp, "megalm"), 0, model, config)
        megalm_to_hf(os.path.join(tmp, "megalm"), os.path.join(tmp, "hf"), log=lambda *a: None)
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype)
    model.to(device=device, dtype=dtype).eval()
    hf.to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)

    print(f"device {device} ({torch.get_num_threads()} threads on CPU), {dtype}, preset {args.preset} "
          f"({model.num_parameters() / 1e6:.1f}M parameters), prompt {args.prompt_tokens} + {args.new_tokens} "
          f"new tokens, greedy, torch {torch.__version__}, transformers {transformers.__version__}")
    print("| batch | megalm tokens/s | HF generate tokens/s | megalm / HF | same tokens |")
    print("|---|---|---|---|---|")
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_tokens),
                                generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            t_ours, ours = timed(lambda: generate(model, prompts.tolist(), params), args.repeats)
            t_hf, theirs = timed(lambda: hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                                     max_new_tokens=args.new_tokens, do_sample=False), args.repeats)
        same = [r.tokens for r in ours] == theirs[:, args.prompt_tokens:].tolist()
        n = batch * args.new_tokens
        rows.append({"batch": batch, "megalm_tokens_per_s": n / t_ours, "hf_tokens_per_s": n / t_hf,
                     "same_tokens": same})
        print(f"| {batch} | {n / t_ours:.1f} | {n / t_hf:.1f} | {t_hf / t_ours:.2f} | {'yes' if same else 'no'} |")
    return rows


def main(argv=None) -> int:
    compare(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
