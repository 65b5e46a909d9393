#!/usr/bin/env python
"""Training throughput: megalm's GPTModel against a plain-PyTorch nanoGPT-style model, same process.

Both models have the same shape and are trained the same way (AdamW, bf16 autocast on a GPU, fp32
on CPU; forward + backward + optimizer step on random tokens), eager and under torch.compile. The
table gives tokens/s, TFLOP/s per device, MFU, peak memory and the ratio megalm / reference for
each mode.

    python tools/bench/train_throughput.py                      # GPT-2 124M shape on a GPU
    python tools/bench/train_throughput.py --preset tiny        # a small shape that suits a CPU
    python tools/bench/train_throughput.py --preset llama-1b --micro-batch-size 4 --seq-length 2048
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megalm.config import ModelConfig  # noqa: E402
from megalm.model import GPTModel  # noqa: E402
from megalm.training.metrics import peak_flops  # noqa: E402

PRESETS = {
    # GPT-2 small as in nanoGPT: 12 x 768, 12 heads, seq 1024, vocab 50304.
    "gpt2-124m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024,
                      padded_vocab_size=50304, micro_batch_size=16),
    "llama-1b": dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                     ffn_hidden_size=5632, seq_length=2048, padded_vocab_size=32000, micro_batch_size=4,
                     position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                     add_bias_linear=False, untie_embeddings_and_output_weights=True),
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256,
                 padded_vocab_size=8192, micro_batch_size=8),
}


class NanoGPTBlock(nn.Module):
    """nanoGPT's block: LayerNorm, fused qkv, SDPA causal attention, GELU MLP, residuals."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.padded_vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.seq_length, c.hidden_size)
        self.blocks = nn.ModuleList(NanoGPTBlock(c.hidden_size, c.num_attention_heads) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size)

    def forward(self, tokens, labels):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def hf_llama(c: ModelConfig):
    """Hugging Face's LlamaForCausalLM of the same shape, when transformers is installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    cfg = LlamaConfig(vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size,
                      intermediate_size=c.ffn_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.query_groups,
                      max_position_embeddings=c.seq_length, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, labels):
            logits = self.model(input_ids=tokens).logits
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    return Wrapped()


def measure(model: nn.Module, c: ModelConfig, mbs: int, steps: int, warmup: int, device, dtype,
            after_step=None) -> dict:
    """Median tokens/s of `steps` training steps after `warmup` ones; `after_step()` runs after each
    optimizer step (FP8 delayed scaling moves its scales there)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, c.padded_vocab_size, (mbs, c.seq_length + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(inputs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first_loss = loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": mbs * c.seq_length / step_time, "memory_gb": memory, "loss": loss.item(),
            "first_loss": first_loss}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape (default: gpt2-124m on a GPU, tiny on CPU)")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    parser.add_argument("--peer", choices=["nanogpt", "hf-llama"], default=None,
                        help="reference model (default: nanogpt; hf-llama for the llama-1b preset)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = dict(PRESETS[args.preset or ("gpt2-124m" if device.type == "cuda" else "tiny")])
    mbs = args.micro_batch_size or preset.pop("micro_batch_size")
    preset.pop("micro_batch_size", None)
    if args.seq_length:
        preset["seq_length"] = args.seq_length
    c = ModelConfig(attention_dropout=0.0, hidden_dropout=0.0, **preset)
    peer_name = args.peer or ("hf-llama" if c.swiglu else "nanogpt")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (20 if device.type == "cuda" else 5)
    warmup = args.warmup or (5 if device.type == "cuda" else 2)
    peak = peak_flops(device, dtype)

    rows = []
    for mode in args.modes.split(","):
        results = {}
        for name in ("megalm", peer_name):
            torch.manual_seed(0)
            if name == "megalm":
                model = GPTModel(c)
            elif name == "nanogpt":
                model = NanoGPT(c)
            else:
                model = hf_llama(c)
                if model is None:
                    print("transformers is not installed: skipping the hf-llama peer")
                    continue
            model = model.to(device)
            flops_per_token = GPTModel.flops_per_token(model if name == "megalm" else _FlopsProxy(c))
            run_model = torch.compile(model) if mode == "compile" else model
            r = measure(run_model, c, mbs, steps, warmup, device, dtype)
            r["tflops"] = flops_per_token * r["tokens_per_s"] / 1e12
            r["mfu"] = r["tflops"] * 1e12 / peak if peak else float("nan")
            results[name] = r
            del model, run_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for name, r in results.items():
            ratio = r["tokens_per_s"] / results[peer_name]["tokens_per_s"] if peer_name in results else float("nan")
            rows.append((mode, name, r, ratio))

    print(f"\ndevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} | "
          f"dtype {str(dtype)[6:]} | layers {c.num_layers} hidden {c.hidden_size} heads "
          f"{c.num_attention_heads} seq {c.seq_length} vocab {c.padded_vocab_size} micro batch {mbs} | "
          f"torch {torch.__version__}\n")
    print("| mode | model | tokens/s | TFLOP/s | MFU | peak mem (GB) | vs reference |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, name, r, ratio in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if math.isfinite(r["mfu"]) else "n/a"
        print(f"| {mode} | {name} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | "
              f"{r['memory_gb']:.2f} | {ratio:.2f}x |")


class _FlopsProxy:
    """Lets GPTModel.flops_per_token count the FLOPs of a peer model of the same shape."""

    def __init__(self, config: ModelConfig):
        self.config = config


if __name__ == "__main__":
    main()
