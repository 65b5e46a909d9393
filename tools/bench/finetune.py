#!/usr/bin/env python
"""Fine-tuning throughput and memory: megalm's SFT, LoRA and QLoRA, unpacked and packed, against
Hugging Face TRL's SFTTrainer + peft LoRA, on the same Llama-shaped model and the same chat data.

The script writes everything it measures on into --work-dir: a byte-level BPE tokenizer with a
ChatML template (its assistant turns in {% generation %} blocks, so both trainers train on the
assistant tokens only), synthetic conversations of 30-250 tokens (short and varied, the case
packing is for), a base checkpoint (pretrain_gpt.py --mock-data, one step) and its Hugging Face
export (tools/convert_checkpoint.py --saver hf) for TRL. Each configuration then runs in a child
process of its own (`--child NAME`), so that its peak memory is its own: on a GPU
torch.cuda.max_memory_allocated, on CPU the peak resident set (getrusage), also given above the
child's resident set before it builds the model (the Python, torch and library baseline).

Reported: real (non-padding) input tokens per second over the timed steps (the steps after
--warmup; a step runs from the start of its first forward to the start of the next step's) and
the ratios the targets are stated in. TRL pads each unpacked batch to its longest sample, megalm
to --seq-length; TRL packs with its default strategy (best-fit decreasing, padding-free).

    python tools/bench/finetune.py                                   # small model, suits a CPU
    python tools/bench/finetune.py --num-layers 16 --hidden-size 2048 --num-attention-heads 16 \\
        --num-query-groups 4 --seq-length 2048 --micro-batch-size 8 --steps 20   # on a GPU
    python tools/bench/finetune.py --quick --configs megalm          # smoke run, megalm only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML; the assistant's content and end-of-turn token are the generation block (the trained tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# name -> (trainer, LoRA, QLoRA, packed)
CONFIGS = {
    "megalm-full": ("megalm", False, False, False),
    "megalm-full-packed": ("megalm", False, False, True),
    "megalm-lora": ("megalm", True, False, False),
    "megalm-lora-packed": ("megalm", True, False, True),
    "megalm-qlora": ("megalm", True, True, False),
    "megalm-qlora-packed": ("megalm", True, True, True),
    "trl-lora": ("trl", True, False, False),
    "trl-lora-packed": ("trl", True, False, True),
}
LORA_TARGETS = "all-linear"


# ---- data, tokenizer and models ---------------------------------------------------------------------


def vocabulary_words(rng: random.Random, count: int = 400) -> list:
    """Pronounceable made-up words of one to three syllables."""
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def sentence(rng: random.Random, words: list, length: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(max(length, 1)))
    return text[0].upper() + text[1:] + rng.choice(".?!")


def conversations(count: int, seed: int) -> list:
    """Chats of one to three turns whose lengths spread over about 30-250 tokens."""
    rng = random.Random(seed)
    words = vocabulary_words(rng)
    chats = []
    for _ in range(count):
        turns = rng.randint(1, 3)
        budget = rng.randint(20, 230) - 6 * turns  # ~6 template tokens per message
        messages = []
        for _ in range(turns):
            user = max(2, int(budget / turns * rng.uniform(0.2, 0.5)))
            messages.append({"role": "user", "content": sentence(rng, words, user)})
            messages.append({"role": "assistant", "content": sentence(rng, words, budget // turns - user)})
        chats.append({"messages": messages})
    return chats


def write_tokenizer(directory: str, chats: list, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json trained on the chats, and the tokenizer_config.json with the
    chat template that both megalm and transformers read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((m["content"] for chat in chats for m in chat["messages"]), trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def model_flags(args) -> list:
    flags = ["--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
             "--num-attention-heads", args.num_attention_heads, "--seq-length", args.seq_length,
             "--max-position-embeddings", args.seq_length, "--position-embedding-type", "rope",
             "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0"]
    for flag, value in (("--num-query-groups", args.num_query_groups), ("--ffn-hidden-size", args.ffn_hidden_size)):
        if value:
            flags += [flag, value]
    return [str(f) for f in flags]


def _run(command: list, what: str) -> str:
    out = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {out.returncode}):\n{out.stderr[-3000:] or out.stdout[-3000:]}")
    return out.stdout


def work_paths(args) -> dict:
    """Files in a folder of --work-dir named for the model, tokenizer and data settings, so that a
    --work-dir reused with other settings never serves a base checkpoint of another shape."""
    settings = json.dumps([model_flags(args), args.vocab_size, args.samples, args.seed])
    root = os.path.join(args.work_dir, "setup-" + hashlib.sha256(settings.encode()).hexdigest()[:12])
    return {"tok": os.path.join(root, "tokenizer"), "data": os.path.join(root, "chat.jsonl"),
            "base": os.path.join(root, "base"), "hf": os.path.join(root, "base_hf")}


def prepare(args, with_hf: bool) -> None:
    """The tokenizer, chat jsonl, base checkpoint and (for TRL) its Hugging Face export in --work-dir."""
    paths = work_paths(args)
    chats = conversations(args.samples, args.seed)
    write_tokenizer(paths["tok"], chats, args.vocab_size)
    with open(paths["data"], "w") as f:
        f.writelines(json.dumps(chat) + "\n" for chat in chats)
    if not os.path.isdir(paths["base"]):
        print(f"writing the base checkpoint to {paths['base']}", flush=True)
        _run(["pretrain_gpt.py", "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", os.path.join(paths["tok"], "tokenizer.json"), *model_flags(args),
              "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4", "--eval-iters", "0",
              "--save", paths["base"]], "pre-training the base checkpoint")
    if with_hf and not os.path.isdir(paths["hf"]):
        print(f"exporting it to Hugging Face format in {paths['hf']}", flush=True)
        _run(["tools/convert_checkpoint.py", "--loader", "megalm", "--saver", "hf", "--load-dir", paths["base"],
              "--save-dir", paths["hf"]], "exporting the base checkpoint to Hugging Face format")


# ---- the children: one configuration each ----------------------------------------------------------


class StepClock:
    """Start times and real-token counts of each optimizer step, taken at its first forward."""

    def __init__(self):
        self.starts, self.tokens = [], []

    def step(self, real_tokens: int) -> None:
        self.starts.append(time.perf_counter())
        self.tokens.append(real_tokens)

    def throughput(self, warmup: int) -> float:
        """Real tokens/s over steps warmup .. n-2 (the last step has no next start)."""
        if len(self.starts) < warmup + 2:
            raise SystemExit(f"error: {len(self.starts)} steps ran, too few to time any after --warmup {warmup}")
        return sum(self.tokens[warmup:-1]) / (self.starts[-1] - self.starts[warmup])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_result(device, baseline_mb: float) -> dict:
    import torch
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mb": peak, "baseline_mb": 0.0, "training_mb": peak}
    peak = rss_mb()
    return {"peak_mb": peak, "baseline_mb": baseline_mb, "training_mb": peak - baseline_mb}


def run_megalm(args, name: str, paths: dict) -> dict:
    """posttrain_gpt.main in this process, with its trainer's forward step timed and its rows counted."""
    import numpy as np
    import torch

    import posttrain_gpt
    baseline = rss_mb()
    _, lora, qlora, packed = CONFIGS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = ["--task", "sft", "--load", paths["base"], "--data-path", paths["data"],
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size),
            "--train-iters", str(args.warmup + args.steps + 1), "--lr", "1e-4", "--log-interval", "1000000",
            "--eval-iters", "0", "--split", "100,0,0", "--seed", str(args.seed)] + model_flags(args)
    argv += ["--packing"] * packed + ["--bf16"] * (device == "cuda")
    if lora:
        argv += ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
                 "--lora-target-modules", LORA_TARGETS]
    if qlora:
        argv += ["--lora-base-quantization", "int4"]
    clock, found = StepClock(), {}

    def datasets_provider(config, num_samples):
        datasets = posttrain_gpt.datasets_provider(config, num_samples)
        train = found["train"] = datasets[0]
        # Real positions of each row, in the order the sampler reads them (one data-parallel rank).
        lengths = np.minimum(train.samples.lengths[train.row_samples] - 1, train.seq_length)
        per_row = np.add.reduceat(lengths, train.row_offsets[:-1])
        found["row_tokens"] = per_row[train.order]
        return datasets

    def timed(step):
        def timed_step(batch, model):
            row = len(clock.starts) * args.micro_batch_size
            clock.step(int(found["row_tokens"][row: row + args.micro_batch_size].sum()))
            return step(batch, model)
        return timed_step

    pretrain = posttrain_gpt.pretrain
    posttrain_gpt.pretrain = lambda config, provider, _datasets, step: pretrain(config, provider,
                                                                                datasets_provider, timed(step))
    if posttrain_gpt.main(argv) != 0:
        raise SystemExit(f"error: {name}: posttrain_gpt.py failed (its error is above)")
    if device == "cuda":
        torch.cuda.synchronize()
    stats = found["train"].stats
    return {"tokens_per_s": clock.throughput(args.warmup), "device": device,
            "packing_efficiency": stats["packing_efficiency"], "rows": stats["rows"],
            **memory_result(device, baseline)}


def run_trl(args, name: str, paths: dict) -> dict:
    """TRL's SFTTrainer with a peft LoRA of the same rank, alpha and targets on the exported model."""
    try:
        import torch
        from datasets import load_dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        raise SystemExit(f"error: {name} needs trl, peft and datasets ({e}); pip install -r requirements-dev.txt")
    baseline = rss_mb()
    packed = CONFIGS[name][3]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = StepClock()

    class TimedSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # Padding-free (packed) batches are one flat row with no padding; padded ones have a mask.
            mask = inputs.get("attention_mask")
            clock.step(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    model = AutoModelForCausalLM.from_pretrained(paths["hf"], attn_implementation=args.trl_attention)
    config = SFTConfig(
        output_dir=os.path.join(args.work_dir, name), max_length=args.seq_length, packing=packed,
        assistant_only_loss=True, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps + 1, learning_rate=1e-4, logging_steps=1000000, save_strategy="no",
        report_to="none", bf16=device == "cuda", use_cpu=device == "cpu", seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True)
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = TimedSFTTrainer(model=model, args=config, peft_config=peft_config,
                              train_dataset=load_dataset("json", data_files=paths["data"], split="train"),
                              processing_class=AutoTokenizer.from_pretrained(paths["tok"]))
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"tokens_per_s": clock.throughput(args.warmup), "device": device, **memory_result(device, baseline)}


def child(args) -> None:
    run = run_megalm if CONFIGS[args.child][0] == "megalm" else run_trl
    result = run(args, args.child, work_paths(args))
    print("RESULT " + json.dumps({"config": args.child, **result}), flush=True)


# ---- the parent: run, tabulate, compare ------------------------------------------------------------


def measure(args, name: str, forwarded: list) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, *forwarded],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
    raise SystemExit(f"error: configuration {name} failed (exit {out.returncode}):\n{tail}")


def ratio(results: dict, a: str, b: str, key: str) -> float | None:
    if a in results and b in results and results[b][key]:
        return results[a][key] / results[b][key]
    return None


def comparisons(results: dict) -> list:
    """(what, value, target text, met) of each ratio whose configurations ran."""
    rows = []
    for suffix, kind in (("", "unpacked"), ("-packed", "packed")):
        rows.append((f"LoRA tokens/s, megalm / TRL+peft ({kind})",
                     ratio(results, "megalm-lora" + suffix, "trl-lora" + suffix, "tokens_per_s"), ">= 1.5x", 1.5, True))
    for suffix, kind in (("", "unpacked"), ("-packed", "packed")):
        rows.append((f"QLoRA / full fine-tuning peak memory ({kind})",
                     ratio(results, "megalm-qlora" + suffix, "megalm-full" + suffix, "training_mb"),
                     "<= 0.45x", 0.45, False))
    for prefix in ("megalm-full", "megalm-lora", "megalm-qlora", "trl-lora"):
        rows.append((f"packed / unpacked tokens/s ({prefix})",
                     ratio(results, prefix + "-packed", prefix, "tokens_per_s"), ">= 2x", 2.0, True))
    return [(what, value, target, value >= bound if above else value <= bound)
            for what, value, target, bound, above in rows if value is not None]


def table(results: dict, header: str) -> str:
    lines = [header, "", "| configuration | real tokens/s | peak memory (MiB) | above baseline (MiB) | packing efficiency |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        efficiency = f"{r['packing_efficiency']:.2f}" if "packing_efficiency" in r else "n/a"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} | {r['training_mb']:,.0f} | "
                     f"{efficiency} |")
    lines += ["", "| ratio | value | target (GPU) | met |", "|---|---:|---|---|"]
    for what, value, target, met in comparisons(results):
        lines.append(f"| {what} | {value:.2f}x | {target} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-query-groups", type=int, default=None, help="key/value heads (GQA); default: all")
    parser.add_argument("--ffn-hidden-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on the chats")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--samples", type=int, default=1000, help="chats written")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trl-attention", default="sdpa",
                        help="TRL's attn_implementation; its padding-free packing is meant for flash_attention_2 "
                             "(on a GPU where flash-attn is installed), SDPA attends over the whole flattened batch")
    parser.add_argument("--configs", default="all",
                        help="comma list of configuration names or prefixes (megalm, trl); default all: "
                             + ", ".join(CONFIGS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 layers, hidden 64, seq 256, micro batch 2, 2 timed steps after 1, 120 chats")
    parser.add_argument("--work-dir", default=None, help="where the data and checkpoints go (default: a temporary dir)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length = 2, 64, 4, 256
        args.micro_batch_size, args.steps, args.warmup, args.samples = 2, 2, 1, 120
    return args


def _matches(word: str) -> list:
    """A configuration's own name selects it alone; a prefix (megalm, trl-lora) every one it starts."""
    return [word] if word in CONFIGS else [n for n in CONFIGS if n.startswith(word + "-")]


def selected(spec: str) -> list:
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    names = list(CONFIGS) if spec == "all" else [n for n in CONFIGS if any(n in _matches(w) for w in wanted)]
    unknown = [w for w in wanted if w != "all" and not _matches(w)]
    if unknown or not names:
        raise SystemExit(f"error: --configs {spec}: unknown {', '.join(unknown) or 'selection'}; "
                         f"give names or prefixes of {', '.join(CONFIGS)}")
    return names


def trl_available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("trl", "peft", "datasets"))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    names = selected(args.configs)
    if any(CONFIGS[n][0] == "trl" for n in names) and not trl_available():
        print("trl, peft or datasets is not installed: skipping the TRL configurations "
              "(pip install -r requirements-dev.txt)", flush=True)
        names = [n for n in names if CONFIGS[n][0] != "trl"]
    with tempfile.TemporaryDirectory() as scratch:
        args.work_dir = os.path.abspath(args.work_dir or scratch)
        prepare(args, with_hf=any(CONFIGS[n][0] == "trl" for n in names))
        forwarded = sys.argv[1:] if argv is None else list(argv)
        for option in ("--json", "--work-dir"):
            forwarded = _without_option(forwarded, option)
        forwarded += ["--work-dir", args.work_dir]
        results = {}
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name} ...", flush=True)
            results[name] = r = measure(args, name, forwarded)
            print(f"[{i}/{len(names)}] {name}: {r['tokens_per_s']:,.0f} real tokens/s, peak {r['peak_mb']:,.0f} MiB "
                  f"({r['training_mb']:,.0f} above baseline)", flush=True)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    header = (f"device: {device} | layers {args.num_layers} hidden {args.hidden_size} heads {args.num_attention_heads} "
              f"query groups {args.num_query_groups or args.num_attention_heads} seq {args.seq_length} "
              f"micro batch {args.micro_batch_size} | {args.steps} timed steps after {args.warmup} | "
              f"LoRA rank {args.lora_rank} alpha {args.lora_alpha:g} {LORA_TARGETS} | torch {torch.__version__}")
    print("\n" + table(results, header))
    if not torch.cuda.is_available():
        print("\nThe targets are GPU targets; these are CPU numbers (fp32, peak resident set, not GPU memory).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
                       "results": results,
                       "comparisons": [{"ratio": w, "value": v, "target": t, "met": m}
                                       for w, v, t, m in comparisons(results)]}, f, indent=2)


def _without_option(argv: list, option: str) -> list:
    """argv less `option VALUE` / `option=VALUE` (the parent's, not the children's)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
