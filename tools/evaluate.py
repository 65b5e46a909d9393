#!/usr/bin/env python
"""Evaluate a megalm checkpoint: perplexity or multiple-choice accuracy, optionally quantized.

    python tools/evaluate.py --load ckpt --task perplexity --input valid.txt --seq-length 1024 --stride 512
    python tools/evaluate.py --load ckpt --task perplexity --input data/valid_text_document --max-tokens 100000
    python tools/evaluate.py --load ckpt --task multiple-choice --input hellaswag.jsonl
    python tools/evaluate.py --load ckpt --task perplexity --input valid.txt --quantize gptq-int4 \\
        --calibration-input train.txt --save-quantized ckpt-gptq

--input is a text file or an indexed dataset prefix (PREFIX.bin / PREFIX.idx) for perplexity, a
jsonl file of {"context", "choices", "answer"} for multiple choice. With --quantize the model is
evaluated as loaded, then quantized and evaluated again; the result reports both and the sizes.
The last line printed is one JSON object with the results.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megalm.checkpoint import CheckpointError  # noqa: E402
from megalm.convert import ConversionError  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402
from megalm.inference import evaluate, quantize  # noqa: E402
from megalm.inference.context import check_context_length  # noqa: E402
from megalm.inference.loading import load_model, save_quantized  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load", required=True, help="megalm checkpoint (root or iter_XXXXXXX) or quantized model.")
    parser.add_argument("--task", required=True, choices=["perplexity", "multiple-choice"])
    parser.add_argument("--input", required=True, help="Text file / indexed dataset prefix, or a jsonl file.")
    parser.add_argument("--seq-length", type=int,
                        help="Window length (default: the model's --seq-length); past the model's positions it is "
                             "refused with learned position embeddings, warned about with RoPE.")
    parser.add_argument("--stride", type=int, help="perplexity: window step (default: half the window).")
    parser.add_argument("--max-tokens", type=int, help="perplexity: score only the first N tokens of the input.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on a GPU, fp32 on CPU.")
    group = add_quantization_arguments(parser, "weight-only quantization", "Quantize the linear layers and compare.",
                                       "gptq: text file or dataset prefix (default: --input).")
    group.add_argument("--save-quantized", help="Write the quantized model to this directory.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def run_task(args, loaded, seq_length: int) -> dict:
    progress = not args.no_progress
    encode = loaded.tokenizer.encode if loaded.tokenizer is not None else None
    if args.task == "perplexity":
        tokens = evaluate.read_tokens(args.input, encode, args.max_tokens)
        stride = args.stride or max(seq_length // 2, 1)
        return evaluate.perplexity(loaded.model, tokens, seq_length, stride, loaded.vocab_size,
                                   args.batch_size, progress)
    if encode is None:
        raise ValueError("multiple choice needs the checkpoint's tokenizer, and it has none")
    examples = evaluate.read_multiple_choice(args.input)
    return evaluate.multiple_choice(loaded.model, encode, examples, loaded.vocab_size, seq_length,
                                    args.batch_size, progress)


def add_quantization_arguments(parser, title: str, quantize_help: str, calibration_help: str):
    """The weight-only quantization flags (--quantize and its settings), as a group of `parser`."""
    group = parser.add_argument_group(title)
    group.add_argument("--quantize", choices=quantize.METHODS, help=quantize_help)
    group.add_argument("--group-size", type=int, default=128, help="int4: input features per scale.")
    group.add_argument("--symmetric", action="store_true", help="int4: symmetric grid (default: asymmetric).")
    group.add_argument("--act-order", action="store_true", help="gptq: visit columns by decreasing activation.")
    group.add_argument("--calibration-input", help=calibration_help)
    group.add_argument("--calibration-samples", type=int, default=128, help="gptq: calibration sequences.")
    return group


def calibration_batches(args, loaded, seq_length: int) -> list:
    source = args.calibration_input or args.input
    if args.calibration_input is None:
        print(f"note: calibrating on the evaluation input {source} (pass --calibration-input for held-out text)",
              file=sys.stderr)
    encode = loaded.tokenizer.encode if loaded.tokenizer is not None else None
    tokens = evaluate.read_tokens(source, encode, seq_length * args.calibration_samples)
    chunks = [tokens[i:i + seq_length] for i in range(0, len(tokens) - seq_length + 1, seq_length)]
    if not chunks:
        chunks = [tokens]
    return [torch.tensor([c]) for c in chunks[:args.calibration_samples]]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.task == "multiple-choice" and not os.path.isfile(args.input):
            raise ValueError(f"--input {args.input}: no such file")
        if args.save_quantized and not args.quantize:
            raise ValueError("--save-quantized needs --quantize METHOD")
        loaded = load_model(args.load, device=args.device, dtype=args.dtype)
        positions = loaded.config.model.max_positions
        seq_length = args.seq_length or min(loaded.config.model.seq_length, positions)
        warning = check_context_length(loaded.config.model, seq_length, f"--seq-length {seq_length}",
                                       f"pass --seq-length {positions} or less")
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
        result = run_task(args, loaded, seq_length)
        if args.quantize:
            before = dict(result)
            bytes_before = quantize.model_bytes(loaded.model)
            linear_before = quantize.model_bytes(loaded.model, exclude_embeddings=True)
            calibration = calibration_batches(args, loaded, seq_length) if args.quantize == "gptq-int4" else None
            quantize.quantize_model(loaded.model, args.quantize, calibration, group_size=args.group_size,
                                    symmetric=args.symmetric, act_order=args.act_order)
            result = run_task(args, loaded, seq_length)
            settings = {"method": args.quantize, "group_size": args.group_size, "symmetric": args.symmetric,
                        "act_order": args.act_order}
            metric = "perplexity" if args.task == "perplexity" else "acc"
            result["quantization"] = {
                **settings, f"{metric}_unquantized": before[metric],
                "bytes": quantize.model_bytes(loaded.model), "bytes_unquantized": bytes_before,
                "layer_bytes": quantize.model_bytes(loaded.model, exclude_embeddings=True),
                "layer_bytes_unquantized": linear_before}
            if args.save_quantized:
                tokenizer_dir = os.path.join(loaded.path, "tokenizer")
                save_quantized(args.save_quantized, loaded.model, loaded.config, settings, loaded.vocab_size,
                               tokenizer_dir)
                result["quantization"]["saved"] = args.save_quantized
    except (CheckpointError, ConversionError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
