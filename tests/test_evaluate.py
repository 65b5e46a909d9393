"""Evaluation: sliding-window perplexity (against Hugging Face's recipe on the same weights),
multiple-choice log-likelihoods, indexed-dataset input, the lm-evaluation-harness adapter and the
command line."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from megalm.inference import evaluate
from megalm.inference.loading import load_model

transformers = pytest.importorskip("transformers", reason="perplexity is compared with transformers")

from test_convert import REPO, hf_model, quiet, save_hf, write_tokenizer  # noqa: E402

V = 320


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF Llama, megalm LoadedModel of the same weights with a tokenizer, work dir)."""
    from megalm.convert import hf_to_megalm
    root = tmp_path_factory.mktemp("evaluate")
    hf = hf_model("llama", vocab_size=V, init_std=0.05)
    hf_dir = save_hf(hf, str(root / "hf"))
    write_tokenizer(hf_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_to_megalm(hf_dir, str(root / "megalm"), **quiet())
    return hf, load_model(str(root / "megalm"), device="cpu"), root


@pytest.mark.parametrize("n,length,stride", [(100, 16, 8), (101, 16, 15), (17, 16, 1), (5, 16, 8), (64, 16, 5)])
def test_sliding_windows_score_every_token_once(n, length, stride):
    scored = []
    for begin, end, first in evaluate.sliding_windows(n, length, stride):
        assert end - begin <= length and begin < first <= end
        if begin > 0:
            assert first - begin >= length - stride  # context of the first scored token
        scored += range(first, end)
    assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        evaluate.sliding_windows(n, length, length)


def _hf_recipe(model, ids, max_length, stride):
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide."""
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - 1 if begin_loc == 0 else trg_len
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


def test_perplexity_matches_the_transformers_recipe(setup):
    hf, lm, _ = setup
    ids = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    for length, stride in ((64, 24), (64, 63), (128, 64)):
        ours = evaluate.perplexity(lm.model, ids, length, stride, lm.vocab_size, batch_size=3, progress=False)
        nll, count = _hf_recipe(hf, ids, length, stride)
        assert ours["tokens"] == count == 299
        assert ours["nll"] == pytest.approx(nll, abs=1e-5)
        assert ours["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_one_window_is_the_cross_entropy_over_the_true_vocabulary(setup):
    _, lm, _ = setup
    ids = torch.randint(0, V, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = lm.model(ids[:, :-1])[..., :V]  # the padding rows of the vocabulary take no part
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[0, 1:]).item()
    result = evaluate.perplexity(lm.model, ids[0].tolist(), 64, 32, lm.vocab_size, progress=False)
    assert result["nll"] == pytest.approx(loss, abs=1e-5)


def test_multiple_choice_scores_and_accuracy(setup):
    _, lm, _ = setup
    tok, model = lm.tokenizer, lm.model
    examples = [
        {"context": "def wrap(text, width=70, **kwargs):\n    w = TextWrapper(width=width, **kwargs)\n    return",
         "choices": [" w.wrap(text)", " 12 + x", " ))(("], "answer": 0},
        {"context": "import ", "choices": ["re", "os, sys, textwrap, re"], "answer": 1},
        {"context": "class TextWrapper:", "choices": ["\n    pass", "!!", "\n    def __init__(self):"], "answer": 2},
    ]
    result = evaluate.multiple_choice(model, tok.encode, examples, lm.vocab_size, 256, batch_size=2, progress=False)
    # Brute force: the summed log-probabilities of each choice, one sequence at a time.
    acc = acc_norm = 0
    for ex in examples:
        scores = []
        for choice in ex["choices"]:
            context, continuation = evaluate.encode_pair(tok.encode, ex["context"], choice)
            whole = torch.tensor([context + continuation])
            logprobs = evaluate.token_logprobs(model, whole, lm.vocab_size)[0]
            scores.append(logprobs[-len(continuation):].sum().item())
        acc += max(range(len(scores)), key=scores.__getitem__) == ex["answer"]
        norm = [s / len(c) for s, c in zip(scores, ex["choices"])]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == ex["answer"]
    assert result == {"task": "multiple-choice", "examples": 3, "acc": acc / 3, "acc_norm": acc_norm / 3}


def test_encode_pair_moves_the_trailing_space():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    assert evaluate.encode_pair(encode, "Question: ", "yes") == (encode("Question:"), encode(" yes"))


def test_loglikelihood_greedy_flag_and_truncation(setup):
    _, lm, _ = setup
    context = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        greedy_next = lm.model(torch.tensor([context]))[0, -1, :V].argmax().item()
    (score, is_greedy), (_, not_greedy) = evaluate.loglikelihoods(
        lm.model, [(context, [greedy_next]), (context, [(greedy_next + 1) % V])], lm.vocab_size, 64, progress=False)
    assert is_greedy and not not_greedy and score < 0
    long_context = list(range(200)) + context  # truncated from the left to the last 64 + 1 tokens
    truncated = evaluate.loglikelihoods(lm.model, [(long_context, [greedy_next])], lm.vocab_size, 20, progress=False)
    assert truncated[0][0] == pytest.approx(score, abs=1e-5)


def test_loglikelihoods_fill_a_learned_position_table_exactly():
    """max_length + 1 tokens run as max_length positions: the last token is only a target."""
    from megalm.config import ModelConfig
    from megalm.model import GPTModel
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16,
                                 padded_vocab_size=128)).eval()
    context = list(range(40))
    [(score, _)] = evaluate.loglikelihoods(model, [(context, [7])], 128, 16, progress=False)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([context[-16:]]))[0, -1].float(), dim=-1)[7].item()
    assert score == pytest.approx(expected, abs=1e-5)


def test_indexed_dataset_input(setup, tmp_path):
    from megalm.data.indexed_dataset import IndexedDatasetBuilder
    _, lm, _ = setup
    docs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 50, 40)]
    with IndexedDatasetBuilder(str(tmp_path / "valid_text_document")) as builder:
        for doc in docs:
            builder.add_document(doc)
        builder.finalize()
    assert evaluate.read_tokens(str(tmp_path / "valid_text_document"), None) == sum(docs, [])
    assert evaluate.read_tokens(str(tmp_path / "valid_text_document"), None, max_tokens=45) == sum(docs, [])[:45]


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_perplexity_and_multiple_choice(setup, tmp_path):
    import textwrap
    _, lm, root = setup
    ckpt = str(root / "megalm")
    r = _cli("--load", ckpt, "--task", "perplexity", "--input", textwrap.__file__, "--seq-length", "128",
             "--stride", "64", "--max-tokens", "600")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = evaluate.read_tokens(textwrap.__file__, lm.tokenizer.encode, 600)
    expected = evaluate.perplexity(lm.model, tokens, 128, 64, lm.vocab_size, progress=False)
    assert result["task"] == "perplexity" and result["tokens"] == 599
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert "perplexity" in r.stderr  # the tqdm bar

    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"context": f"x = {i}", "choices": [" + 1", " * 2"], "answer": i % 2})
                              for i in range(4)))
    r = _cli("--load", ckpt, "--task", "multiple-choice", "--input", str(data))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["task"] == "multiple-choice" and result["examples"] == 4 and 0 <= result["acc"] <= 1

    data.write_text('{"context": "a", "choices": ["b"]}\n')
    r = _cli("--load", ckpt, "--task", "multiple-choice", "--input", str(data))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "mc.jsonl:1: expected an object with context, choices and answer" in r.stderr


def test_cli_refuses_seq_length_past_learned_positions(tmp_path):
    import textwrap

    from megalm.convert import hf_to_megalm
    hf_dir = save_hf(hf_model("gpt2", vocab_size=V), str(tmp_path / "hf"))  # 128 learned positions
    write_tokenizer(hf_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_to_megalm(hf_dir, str(tmp_path / "megalm"), **quiet())
    args = ("--load", str(tmp_path / "megalm"), "--task", "perplexity", "--input", textwrap.__file__,
            "--max-tokens", "300", "--no-progress")
    r = _cli(*args, "--seq-length", "1024")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip() == ("error: --seq-length 1024 is longer than the model's 128 positions (its learned "
                                "position embeddings have no row past position 127): pass --seq-length 128 or less")
    r = _cli(*args, "--seq-length", "128")  # the length the message offers runs
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["seq_length"] == 128


def test_cli_warns_once_past_rope_positions(setup):
    import textwrap
    _, _, root = setup  # a RoPE model with 128 positions
    r = _cli("--load", str(root / "megalm"), "--task", "perplexity", "--input", textwrap.__file__,
             "--seq-length", "256", "--stride", "128", "--max-tokens", "400", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if "warning" in line] == [
        "warning: the model was trained with 128 positions and --seq-length 256 goes past them: results beyond "
        "position 128 measure how it extrapolates"]
    assert json.loads(r.stdout.strip().splitlines()[-1])["seq_length"] == 256


def test_lm_eval_adapter(setup):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from lm_eval.api.instance import Instance

    from megalm.inference.lm_eval_adapter import MegalmLM
    _, lm, _ = setup
    adapter = MegalmLM(lm, batch_size=2)

    def request(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    context, choice = "def wrap(text):\n", "    return text"
    [(score, _)] = adapter.loglikelihood([request("loglikelihood", context, choice)])
    pair = evaluate.encode_pair(lm.tokenizer.encode, context, choice)
    expected = evaluate.loglikelihoods(lm.model, [pair], lm.vocab_size, 1024, progress=False)[0][0]
    assert score == pytest.approx(expected, abs=1e-6)

    text = "import re\n" * 8  # one window: the summed log-probability of all its tokens
    [rolling] = adapter.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    tokens = [lm.tokenizer.eod] + lm.tokenizer.encode(text)
    assert rolling == pytest.approx(evaluate.token_logprobs(lm.model, torch.tensor([tokens]), V).sum().item(),
                                    abs=1e-4)

    [out] = adapter.generate_until([request("generate_until", "class A:", {"until": ["\n\n"], "max_gen_toks": 12})])
    assert isinstance(out, str) and "\n\n" not in out
