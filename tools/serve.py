#!/usr/bin/env python
"""Serve a megalm model over the OpenAI API, with continuous batching.

    python tools/serve.py --load ckpt --port 8000
    python tools/serve.py --load ckpt --quantize int8 --max-num-seqs 32 --kv-cache-tokens 65536

    torchrun --nproc-per-node 2 tools/serve.py --load ckpt   # tensor-parallel over 2 GPUs

Then POST /v1/completions or /v1/chat/completions (see docs/SERVING.md): any OpenAI client works
with base_url http://HOST:PORT/v1. Under torchrun every process holds a share of each layer's heads
(tensor parallelism) and rank 0 serves HTTP and schedules. The model is named after its directory unless
--served-model-name says otherwise. SIGTERM (or Ctrl-C) stops taking requests, finishes the ones in
flight, then exits.
"""

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.checkpoint import CheckpointError  # noqa: E402
from megalm.convert import ConversionError  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402
from megalm.inference import quantize  # noqa: E402
from megalm.inference.loading import load_model  # noqa: E402
from tools import evaluate as evaluate_tool  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load", required=True, help="megalm checkpoint (root or iter_XXXXXXX) or quantized model.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="The model name clients give (default: the --load directory's).")
    parser.add_argument("--chat-template", help="A Jinja chat template file (default: the tokenizer's, else ChatML).")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on a GPU, fp32 on CPU.")
    group = parser.add_argument_group("batching")
    group.add_argument("--max-num-seqs", type=int, default=16, help="Sequences decoded together at most.")
    group.add_argument("--max-num-batched-tokens", type=int,
                       help="Prompt tokens one prefill step takes at most (default: the model's context).")
    group.add_argument("--kv-cache-tokens", type=int,
                       help="Tokens the paged KV cache holds (default: --max-num-seqs x the model's context).")
    group.add_argument("--block-size", type=int, default=16, help="Tokens per KV cache block.")
    group.add_argument("--max-queue", type=int, default=64,
                       help="Requests that may wait for a slot; more are refused with 429.")
    evaluate_tool.add_quantization_arguments(parser, "quantization", "Quantize the linear layers' weights at load.",
                                             "gptq: text file or dataset prefix to calibrate on.")
    return parser.parse_args(argv)


def quantize_loaded(args, loaded) -> None:
    """--quantize: the loaded model's linears to int8 / int4 / GPTQ int4, in place."""
    calibration = None
    if args.quantize == "gptq-int4":
        if not args.calibration_input:
            raise ValueError("--quantize gptq-int4 needs --calibration-input TEXT_FILE (or load a model already "
                             "quantized by tools/evaluate.py --save-quantized)")
        args.input = args.calibration_input
        calibration = evaluate_tool.calibration_batches(args, loaded, loaded.config.model.seq_length)
    quantize.quantize_model(loaded.model, args.quantize, calibration, group_size=args.group_size,
                            symmetric=args.symmetric, act_order=args.act_order)


def start_tensor_parallel(args, world: int):
    """Under torchrun: one tensor-parallel group of every process (CUDA: one GPU each; CPU: gloo)."""
    from megalm.config import Config
    from megalm.parallel.state import initialize
    if args.quantize:
        raise ValueError("--quantize runs on one process only: drop it, or start tools/serve.py without torchrun")
    config = Config()
    config.parallel.tensor_model_parallel_size = world
    config.train.device = args.device or "auto"
    return initialize(config)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = None
    try:
        import uvicorn

        from megalm.inference.server import build_app, make_server
        if world > 1:
            parallel = start_tensor_parallel(args, world)
        loaded = load_model(args.load, device=parallel.device if parallel else args.device, dtype=args.dtype,
                            parallel=parallel)
        if args.quantize:
            quantize_loaded(args, loaded)
        engine, served = make_server(loaded, args.served_model_name, args.chat_template, args.max_num_seqs,
                                     args.max_num_batched_tokens, args.kv_cache_tokens, args.block_size,
                                     args.max_queue, parallel)
    except (CheckpointError, ConversionError, DataError, ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if parallel is not None and parallel.rank != 0:
            # torchrun passes SIGTERM / Ctrl-C to every rank: this one keeps running steps while rank 0
            # finishes the requests in flight, and ends when rank 0 says no more will come.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            engine.runner.follow()  # rank 0 schedules; this rank runs its share of every step
            return 0
        print(f"serving {served.name!r} ({served.max_positions} positions, KV cache of {engine.cache.capacity} "
              f"tokens" + (f", tensor-parallel over {world} processes" if parallel else "")
              + f") on http://{args.host}:{args.port}/v1", file=sys.stderr)
        config = uvicorn.Config(build_app(engine, served), host=args.host, port=args.port, log_level="info",
                                timeout_graceful_shutdown=None)
        uvicorn.Server(config).run()
        return 0
    finally:
        engine.runner.release_followers()  # also when the server could not start
        if parallel is not None:
            from megalm.parallel.state import destroy
            destroy()


if __name__ == "__main__":
    sys.exit(main())
