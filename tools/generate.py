#!/usr/bin/env python
"""Generate text from a megalm checkpoint.

    python tools/generate.py --load ckpt --prompt "Once upon a time" --max-new-tokens 64
    python tools/generate.py --load ckpt --prompt-file prompts.txt --temperature 0.8 --top-p 0.95 --seed 1

One prompt is streamed to the terminal as it is generated; several prompts (--prompt repeated, or
--prompt-file with one prompt per line) are generated together as one batch and printed at the end.
--temperature 0 (or --greedy) decodes greedily. bf16 on a GPU, fp32 on CPU (see --dtype). A
checkpoint without a tokenizer reads and writes space-separated token ids.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.checkpoint import CheckpointError  # noqa: E402
from megalm.convert import ConversionError  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402
from megalm.inference.generate import SamplingParams, TextStreamer, generate  # noqa: E402
from megalm.inference.loading import load_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load", required=True, help="megalm checkpoint (root or iter_XXXXXXX) or quantized model.")
    parser.add_argument("--prompt", action="append", default=[], help="A prompt (repeat for a batch).")
    parser.add_argument("--prompt-file", help="A file with one prompt per line.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy.")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (same as --temperature 0).")
    parser.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (0: off).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (1: off).")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1: off).")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the sampling.")
    parser.add_argument("--stop", action="append", default=[], help="Stop at this string (repeatable).")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[],
                        help="Stop at this token id (repeatable); the end-of-document token always stops.")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on a GPU, fp32 on CPU.")
    parser.add_argument("--no-stream", action="store_true", help="Print a single prompt's text only at the end.")
    return parser.parse_args(argv)


def stopped(results, args) -> str:
    """Why generation ended, in words: one reason, or each prompt's when they differ."""
    reasons = {"length": f"reached --max-new-tokens {args.max_new_tokens}",
               "stop_token": "end of text or a --stop-token-id" if args.stop_token_id else "end of text",
               "stop_string": "found a --stop string"}
    said = [reasons[r.finish_reason] for r in results]
    if len(set(said)) == 1:
        return f"(stopped: {said[0]})"
    return "(stopped: " + "; ".join(f"prompt {i}: {reason}" for i, reason in enumerate(said)) + ")"


def main(argv=None) -> int:
    args = parse_args(argv)
    # A library warning (a prompt past a RoPE model's trained context) is one line, like an error.
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        prompts = list(args.prompt)
        if args.prompt_file:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError("give a prompt with --prompt TEXT or --prompt-file FILE")
        loaded = load_model(args.load, device=args.device, dtype=args.dtype)
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            from megalm.data.tokenizer.null import NullTokenizer
            tokenizer = NullTokenizer(loaded.vocab_size)
            tokenizer.eod = None  # no end-of-document token is known
        encoded = [tokenizer.encode(p) for p in prompts]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, stop_token_ids=args.stop_token_id, stop_strings=args.stop)
        stream = len(prompts) == 1 and not args.no_stream
        streamer = None
        if stream:
            print(prompts[0], end="", flush=True)
            streamer = TextStreamer(tokenizer.decode, lambda text: print(text, end="", flush=True))
        start = time.perf_counter()
        results = generate(loaded.model, encoded, params, vocab_size=loaded.vocab_size, eod=tokenizer.eod,
                           decode=tokenizer.decode, on_token=streamer)
        elapsed = time.perf_counter() - start
        if stream:
            printed = streamer.decode(streamer.tokens)[:streamer.printed]
            rest = results[0].text[len(printed):] if results[0].text.startswith(printed) else ""
            print(rest)
        else:
            for i, (prompt, result) in enumerate(zip(prompts, results)):
                if len(prompts) > 1:
                    print(f"=== {i} ===")
                print(prompt + result.text)
        new_tokens = sum(len(r.tokens) for r in results)
        print(stopped(results, args), file=sys.stderr)
        print(f"(generated {new_tokens} tokens in {elapsed:.2f} s, {new_tokens / max(elapsed, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    except (CheckpointError, ConversionError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
