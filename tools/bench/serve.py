#!/usr/bin/env python
"""Serving throughput and latency: tools/serve.py against `transformers serve`, same weights, same run.

A random-weight model (a tokenizer without an end-of-text token, so every request runs to its
max_tokens) is saved as a megalm checkpoint and exported to a Hugging Face directory. Both servers
run on loopback ports and take the same load in turn (one at a time, the order alternating over
--rounds, so that the load of a shared machine drifts over both): C concurrent clients (for each C
of --concurrency) each sending streamed completion requests back to back, --requests-per-client
each or until --time-limit seconds (and at least --min-requests in all). Reported per C:
requests/s, output tokens/s, time to first token and inter-token latency (p50 / p99), the ratios
megalm / peer and C clients / one client, and how many requests got the same text from both.

    python tools/bench/serve.py                                   # CPU-sized
    python tools/bench/serve.py --concurrency 1 16 --peer none    # megalm only

The peer is `transformers serve --continuous-batching` (paged attention, its own scheduler) with
the exported model forced; `--peer none` skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megalm.checkpoint import save_checkpoint  # noqa: E402
from megalm.config import Config, DataConfig, ModelConfig  # noqa: E402
from megalm.convert import megalm_to_hf  # noqa: E402

PRESETS = {
    # Llama-shaped (GQA, SwiGLU, RMSNorm, RoPE), small enough for a shared CPU.
    "llama-tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                       ffn_hidden_size=704),
    "llama-small": dict(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=1408),
}
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
             untie_embeddings_and_output_weights=True, attention_dropout=0.0, hidden_dropout=0.0,
             init_method_std=0.05)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-tiny", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=2048, help="Tokens of the BPE tokenizer trained here.")
    parser.add_argument("--context", type=int, default=512, help="The model's positions.")
    parser.add_argument("--prompt-words", type=int, default=24, help="Words of text per prompt (about as many tokens).")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens each request generates.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=16, help="Requests per level at least (more per client).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds per level, alternating which server goes first.")
    parser.add_argument("--time-limit", type=float, default=60.0, help="Seconds per concurrency level at most.")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="megalm's batch cap.")
    parser.add_argument("--peer", default="transformers-serve", choices=["transformers-serve", "none"])
    parser.add_argument("--keep", action="store_true", help="Keep the model and the servers' logs (path printed).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="Torch threads of each server.")
    return parser.parse_args(argv)


# ---- the model ------------------------------------------------------------------------------------


def write_model(root: str, args) -> tuple:
    """(megalm checkpoint, HF directory) of one random model with a BPE tokenizer trained on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok_dir = os.path.join(root, "tokenizer")
    os.makedirs(tok_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(argparse.__file__, encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(tok_dir, "tokenizer.json"))
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": args.context}, f)
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    padded = -(-vocab // 128) * 128
    model_config = ModelConfig(**PRESETS[args.preset], **LLAMA, seq_length=args.context,
                               max_position_embeddings=args.context, padded_vocab_size=padded, vocab_size=vocab)
    config = Config(model=model_config, data=DataConfig(tokenizer_type="HuggingFaceTokenizer",
                                                        tokenizer_model=os.path.join(tok_dir, "tokenizer.json")))
    from megalm.model import GPTModel
    ckpt, hf = os.path.join(root, "megalm"), os.path.join(root, "hf")
    save_checkpoint(ckpt, 0, GPTModel(model_config), config)
    megalm_to_hf(ckpt, hf, log=lambda *a: None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), hf)
    with open(os.path.join(hf, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": None, "pad_token_id": 0, "do_sample": False}, f)
    return ckpt, hf, text.split()


# ---- the servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list, url: str, log_path: str, threads: int, timeout: float = 300.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{' '.join(command)} did not answer /health within {timeout:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the load -------------------------------------------------------------------------------------


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: TTFT, the arrival time of each text chunk, and the tokens counted."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens, texts = [], None, []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if text:
                arrivals.append(time.perf_counter())
                texts.append(text)
    if not arrivals:
        raise RuntimeError(f"{url}: a request streamed no text")
    return {"prompt": prompt, "text": "".join(texts), "start": start, "arrivals": arrivals,
            "tokens": tokens if tokens is not None else len(arrivals)}


async def load(url: str, model: str, prompts: list, concurrency: int, per_client: int, max_tokens: int,
               time_limit: float) -> tuple:
    """C clients sending requests back to back: (the requests' records, wall seconds, retries)."""
    import httpx
    results, retries = [], []
    begin = time.perf_counter()

    async def client_loop(k: int, client):
        for i in range(per_client):
            if time.perf_counter() - begin > time_limit:
                return
            prompt = prompts[(k * per_client + i) % len(prompts)]
            try:
                results.append(await one_request(client, url, model, prompt, max_tokens))
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A kept-alive connection the server closed as it was reused: the request never ran.
                retries.append(prompt)
                results.append(await one_request(client, url, model, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(k, client) for k in range(concurrency)))
    return results, time.perf_counter() - begin, len(retries)


def stats(runs: list) -> dict:
    """Figures of a level's rounds pooled: [(records, wall, retries)]."""
    results = [r for records, _, _ in runs for r in records]
    wall = sum(w for _, w, _ in runs)
    ttft = [r["arrivals"][0] - r["start"] for r in results]
    # Inter-token latency: a request's decode time over its tokens after the first.
    itl = [(r["arrivals"][-1] - r["arrivals"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "retried": sum(n for _, _, n in runs), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "texts": {r["prompt"]: r["text"] for r in results}}


def pct(values: list, q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(name: str, c: int, r: dict) -> None:
    print(f"{name:>8} C={c:<3} {r['requests']:>4} requests ({r['retried']} retried) in {r['wall_s']:.1f} s: "
          f"{r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, TTFT p50/p99 {r['ttft_p50'] * 1e3:.0f}/"
          f"{r['ttft_p99'] * 1e3:.0f} ms, ITL p50/p99 {r['itl_p50'] * 1e3:.1f}/{r['itl_p99'] * 1e3:.1f} ms", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = tempfile.mkdtemp(prefix="megalm-bench-serve-")
    procs = []
    try:
        ckpt, hf, words = write_model(root, args)
        prompts = [" ".join(words[i * args.prompt_words:(i + 1) * args.prompt_words]) for i in range(256)]
        print(f"preset {args.preset}, context {args.context}, prompts of {args.prompt_words} words, "
              f"{args.max_tokens} new tokens each, greedy; {args.threads} torch threads per server, "
              f"{args.rounds} rounds per level alternating the servers, torch {torch.__version__}", flush=True)
        servers = {}  # name -> (url, model name)
        port = free_port()
        procs.append(start([sys.executable, os.path.join(REPO, "tools", "serve.py"), "--load", ckpt, "--port",
                            str(port), "--served-model-name", "bench", "--max-num-seqs", str(args.max_num_seqs),
                            "--max-queue", "1024"], f"http://127.0.0.1:{port}", os.path.join(root, "megalm.log"),
                           args.threads))
        servers["megalm"] = (f"http://127.0.0.1:{port}", "bench")
        if args.peer == "transformers-serve":
            port = free_port()
            procs.append(start(["transformers", "serve", hf, "--continuous-batching", "--device", "cpu", "--port",
                                str(port), "--host", "127.0.0.1"], f"http://127.0.0.1:{port}",
                               os.path.join(root, "peer.log"), args.threads))
            servers["peer"] = (f"http://127.0.0.1:{port}", hf)
        for url, model in servers.values():  # warm-up
            asyncio.run(load(url, model, prompts, 1, 1, args.max_tokens, args.time_limit))
        rows = {name: {} for name in servers}
        for c in args.concurrency:
            per_client = max(args.requests_per_client, -(-args.min_requests // c))
            runs = {name: [] for name in servers}
            for round_ in range(args.rounds):  # megalm first, then the peer first, ...: drift hits both
                for name in (list(servers) if round_ % 2 == 0 else list(servers)[::-1]):
                    url, model = servers[name]
                    runs[name].append(asyncio.run(load(url, model, prompts, c, per_client, args.max_tokens,
                                                       args.time_limit)))
            for name in servers:
                rows[name][c] = stats(runs[name])
                report(name, c, rows[name][c])
        summarize(rows["megalm"], rows.get("peer"))
    finally:
        for proc in procs:
            stop(proc)
        if args.keep:
            print(f"model, tokenizer and server logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def summarize(ours: dict, peer) -> None:
    if peer:
        pairs = [(t, p[prompt]) for c in ours if c in peer for p in [peer[c]["texts"]]
                 for prompt, t in ours[c]["texts"].items() if prompt in p]
        same = sum(a == b for a, b in pairs)
        print(f"\nsame greedy text from both servers: {same} of {len(pairs)} requests")
    print()
    fewest = min(ours)
    scale = "x one client" if fewest == 1 else f"x {fewest} clients"
    print(f"| clients | megalm req/s | megalm tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | {scale} "
          + ("| peer tok/s | peer TTFT p50 / p99 ms | peer ITL p50 / p99 ms | megalm / peer |" if peer else "|"))
    print("|---" * (10 if peer else 6) + "|")
    one = ours[fewest]["tokens_per_s"]
    for c, r in ours.items():
        line = (f"| {c} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['ttft_p50'] * 1e3:.0f} / "
                f"{r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f} | "
                f"{r['tokens_per_s'] / one:.2f} |")
        if peer and c in peer:
            p = peer[c]
            line += (f" {p['tokens_per_s']:.1f} | {p['ttft_p50'] * 1e3:.0f} / {p['ttft_p99'] * 1e3:.0f} | "
                     f"{p['itl_p50'] * 1e3:.1f} / {p['itl_p99'] * 1e3:.1f} | {r['tokens_per_s'] / p['tokens_per_s']:.2f} |")
        print(line)


if __name__ == "__main__":
    sys.exit(main())
