"""posttrain_gpt.py end to end on tiny models: chat SFT (full and LoRA, packed), exact resume,
distillation (online and from cached teacher logits), and the command-line errors."""

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from tests.test_sft_data import write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket", "garden",
         "silver", "winter", "bridge", "island", "mirror", "pepper", "castle", "orange", "violet"]
# The answer names three colours drawn at random: a sample's labels show one draw, a trained teacher
# the whole distribution (what distillation adds to the labels).
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
ANSWER = "My colours are"


def _answer(rng):
    return f"{ANSWER} {rng.choice(COLOURS)}, {rng.choice(COLOURS)} and {rng.choice(COLOURS)}."
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--attention-dropout", "0", "--hidden-dropout", "0"]


def _run(script, *flags, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def _losses(output: str, kind: str = "iter") -> list:
    if kind == "iter":
        return [float(x) for x in re.findall(r"^iter \d+/\d+ \|.*? loss ([\d.]+)", output, re.M)]
    return [float(x) for x in re.findall(r"^validation at iteration \d+ \| loss ([\d.]+)", output, re.M)]


def _conversations(names, seed):
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"Hello {name}, what is your name?"},
                          {"role": "assistant", "content": _answer(rng)}]} if rng.random() < 0.7 else
            {"prompt": f"Hello {name}, what is your name?", "completion": " " + _answer(rng)}
            for name in names]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer with a ChatML template, chat jsonl, and a base checkpoint pre-trained on mock data."""
    root = tmp_path_factory.mktemp("posttrain")
    tok = write_tokenizer(root / "tok")
    train = root / "chat.jsonl"
    with open(train, "w") as f:
        for record in _conversations(NAMES[:16] * 4, seed=0):
            f.write(json.dumps(record) + "\n")
    base = root / "base"
    _run("pretrain_gpt.py", "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         os.path.join(tok, "tokenizer.json"), *MODEL, "--micro-batch-size", "4", "--train-iters", "2",
         "--lr", "1e-3", "--eval-iters", "0", "--save", str(base))
    return {"root": root, "tok": tok, "data": str(train), "base": str(base)}


def _sft(setup, save, *flags, ok=True):
    return _run("posttrain_gpt.py", "--task", "sft", "--load", setup["base"], "--save", str(save),
                "--data-path", setup["data"], "--micro-batch-size", "4", "--global-batch-size", "8",
                "--lr", "3e-3", "--lr-warmup-iters", "5", "--log-interval", "1", "--eval-iters", "1",
                "--eval-interval", "1000", "--split", "90,10,0", "--seed", "5", *flags, ok=ok)


def _greedy(checkpoint, tok_dir, prompt_messages, max_new=40):
    from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
    from megalm.data.chat import load_chat_templates, select_template
    from megalm.data.tokenizer.huggingface import HuggingFaceTokenizer
    from megalm.model import GPTModel
    found = open_checkpoint(checkpoint)
    config = checkpoint_config(found)
    model = GPTModel(config.model)
    model.load_state_dict({k: v for k, v in found["model"].items()}, strict=False)
    model.eval()
    tokenizer = HuggingFaceTokenizer(os.path.join(tok_dir, "tokenizer.json"))
    template = select_template(load_chat_templates(tok_dir, tokenizer), None)
    ids = tokenizer.encode(template.render(prompt_messages, add_generation_prompt=True))
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, :config.model.vocab_size]
        ids.append(int(logits.argmax()))
    return tokenizer.decode(ids)


@pytest.mark.slow
def test_chat_sft_learns_the_assistant_pattern_and_answers_a_held_out_prompt(setup):
    out = _sft(setup, setup["root"] / "sft", "--train-iters", "60", "--packing")
    losses = _losses(out.stdout)
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5, losses
    text = _greedy(str(setup["root"] / "sft"), setup["tok"],
                   [{"role": "user", "content": f"Hello {NAMES[-1]}, what is your name?"}])
    # The answer's form (the colours themselves are a draw the small model only half learns) and the end of its turn.
    assert re.match(ANSWER + r" [^<]+ and [^<]+\.<\|im_end\|>", text.split("<|im_start|>assistant\n", 1)[1]), text


@pytest.mark.slow
def test_lora_sft_trains_only_adapters_and_resumes_exactly(setup):
    flags = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "all-linear"]
    whole = _sft(setup, setup["root"] / "lora_whole", "--train-iters", "6", *flags)
    assert "trainable" in whole.stdout
    first = _sft(setup, setup["root"] / "lora_cut", "--train-iters", "6", "--exit-interval", "3",
                 "--save-interval", "3", *flags)
    second = _sft(setup, setup["root"] / "lora_cut", "--train-iters", "6", *flags)
    assert "resumed from" in second.stdout
    assert _losses(first.stdout) + _losses(second.stdout) == _losses(whole.stdout)


@pytest.mark.slow
def test_distillation_brings_the_student_to_the_teacher(setup):
    """A 1-layer student distilled from a 2-layer teacher fine-tuned on the chats ends closer to the
    teacher's distribution on held-out chats (forward KL over the assistant tokens) than the same
    student fine-tuned on the labels for the same steps."""
    teacher = setup["root"] / "teacher"
    _sft(setup, teacher, "--train-iters", "60", "--packing")
    student = setup["root"] / "student_base"
    _run("pretrain_gpt.py", "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         os.path.join(setup["tok"], "tokenizer.json"), *MODEL, "--num-layers", "1",
         "--micro-batch-size", "4", "--train-iters", "1", "--eval-iters", "0", "--save", str(student))
    common = ["--data-path", setup["data"], "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
              "--train-iters", "20", "--log-interval", "1", "--eval-iters", "0", "--split", "90,10,0", "--seed", "5"]
    _run("posttrain_gpt.py", "--task", "sft", "--load", str(student), "--save", str(setup["root"] / "alone"), *common)
    _run("posttrain_gpt.py", "--task", "distill", "--load", str(student), "--teacher-load", str(teacher),
         "--kd-ratio", "0.9", "--kd-loss", "forward_kl", "--save", str(setup["root"] / "distilled"), *common)
    reference = _held_out_logits(setup, teacher)
    kl = {name: _forward_kl(reference, _held_out_logits(setup, setup["root"] / name)) for name in ("alone", "distilled")}
    assert kl["distilled"] < 0.9 * kl["alone"], kl


def _held_out_logits(setup, checkpoint):
    """(logits over the tokenizer's tokens, labels) of the held-out rows."""
    from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
    from megalm.data.sft_dataset import build_sft_datasets
    from megalm.model import GPTModel
    found = open_checkpoint(str(checkpoint))
    config = checkpoint_config(found)
    model = GPTModel(config.model)
    model.load_state_dict(found["model"])
    model.eval()
    config.data.data_path = [setup["data"]]
    config.data.split = "90,10,0"
    _, valid, _ = build_sft_datasets(config.data, config.posttrain, config.model.seq_length, 5)
    batch = {k: torch.stack([valid[i][k] for i in range(len(valid))]) for k in ("tokens", "labels")}
    with torch.no_grad():
        return model(batch["tokens"])[..., :config.model.vocab_size], batch["labels"]


def _forward_kl(teacher, student) -> float:
    from megalm.posttrain.distill import generalized_jsd
    (t, labels), (s, _) = teacher, student
    return float(generalized_jsd(s, t, labels, beta=0.0))


@pytest.mark.slow
def test_cached_teacher_logits_are_checked_against_the_run_rows(setup):
    teacher = setup["root"] / "teacher_small"
    _sft(setup, teacher, "--train-iters", "6")
    cache = setup["root"] / "teacher_logits"
    data_flags = ["--data-path", setup["data"], "--split", "90,10,0", "--seed", "5", "--packing"]
    _run("tools/cache_teacher_logits.py", "--load", setup["base"], "--teacher-load", str(teacher),
         "--teacher-logits", str(cache), "--teacher-top-k", "8", *data_flags)
    assert sorted(os.listdir(cache)) == ["train", "valid"]
    out = _run("posttrain_gpt.py", "--task", "distill", "--load", setup["base"], "--teacher-logits", str(cache),
               "--save", str(setup["root"] / "from_cache"), "--micro-batch-size", "4", "--global-batch-size", "8",
               "--train-iters", "2", "--eval-iters", "0", "--log-interval", "1", *data_flags)
    assert len(_losses(out.stdout)) == 2
    # Unpacked rows are other rows: the cache says so instead of pairing logits with the wrong tokens.
    bad = _run("posttrain_gpt.py", "--task", "distill", "--load", setup["base"], "--teacher-logits", str(cache),
               "--save", str(setup["root"] / "bad_cache"), "--micro-batch-size", "4", "--train-iters", "2",
               "--eval-iters", "0", *data_flags[:-1], ok=False)
    assert bad.returncode == 2 and "rebuild them with tools/cache_teacher_logits.py" in bad.stderr, bad.stderr


def test_errors_name_the_flag(tmp_path):
    out = _run("posttrain_gpt.py", "--task", "sft", "--data-path", "x.jsonl", "--train-iters", "1", ok=False)
    assert out.returncode == 2 and "give --load CKPT" in out.stderr, out.stderr
    out = _run("posttrain_gpt.py", "--task", "sft", "--load", str(tmp_path / "none"), "--data-path", "x.jsonl",
               "--train-iters", "1", ok=False)
    assert out.returncode == 2 and "no such checkpoint directory" in out.stderr, out.stderr
    out = _run("posttrain_gpt.py", "--task", "distill", "--load", str(tmp_path), "--data-path", "x.jsonl",
               "--train-iters", "1", ok=False)
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr, out.stderr
