"""Generation: equal to transformers' greedy generation, batched equal to one by one, sampling
controls, stop conditions, streaming and the command line."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from megalm.inference.generate import Generation, SamplingParams, TextStreamer, generate, process_logits
from megalm.inference.loading import load_model

transformers = pytest.importorskip("transformers", reason="generation is compared with transformers")

from test_convert import ARCHS, REPO, VOCAB, hf_model, quiet, save_hf, write_tokenizer  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 30, 40, 50, 60], [7]]


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    """(HF model, megalm LoadedModel) with the same weights."""
    from megalm.convert import hf_to_megalm
    root = tmp_path_factory.mktemp("gen-" + request.param)
    hf = hf_model(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_to_megalm(save_hf(hf, str(root / "hf")), str(root / "megalm"), **quiet())
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as we do without eod
    hf.generation_config.pad_token_id = 0
    return hf, load_model(str(root / "megalm"), device="cpu")


def _greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def _hf_greedy(hf, prompt, n, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(pair):
    hf, lm = pair
    for prompt in PROMPTS[:3]:
        got = generate(lm.model, [prompt], _greedy(24), vocab_size=lm.vocab_size)[0].tokens
        assert got == _hf_greedy(hf, prompt, 24)


def test_repetition_penalty_matches_transformers(pair):
    hf, lm = pair
    got = generate(lm.model, [PROMPTS[0]], _greedy(24, repetition_penalty=1.5), vocab_size=lm.vocab_size)
    assert got[0].tokens == _hf_greedy(hf, PROMPTS[0], 24, repetition_penalty=1.5)


def test_batch_of_different_lengths_equals_one_by_one(pair):
    _, lm = pair
    batched = generate(lm.model, PROMPTS, _greedy(20), vocab_size=lm.vocab_size)
    for prompt, result in zip(PROMPTS, batched):
        alone = generate(lm.model, [prompt], _greedy(20), vocab_size=lm.vocab_size)[0]
        assert result.tokens == alone.tokens


def test_left_padded_logits_equal_unpadded_logits(pair):
    """The first-step logits of each row of a padded batch against the prompt alone (fp32)."""
    _, lm = pair
    from megalm.model import KVCache
    model = lm.model
    longest = max(len(p) for p in PROMPTS)
    tokens = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, longest - len(p):] = torch.tensor(p)
    cache = KVCache(model.config, len(PROMPTS), longest + 1)
    cache.set_left_padding(torch.tensor([longest - len(p) for p in PROMPTS]))
    with torch.no_grad():
        padded = model(tokens, kv_cache=cache)[:, -1]
        for i, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p]))[0, -1]
            assert (padded[i] - alone).abs().max().item() <= 1e-5


def test_seeded_sampling_is_reproducible():
    lm = _random_llama()
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2,
                            seed=7)
    first = [g.tokens for g in generate(lm, PROMPTS, params, vocab_size=VOCAB)]
    assert first == [g.tokens for g in generate(lm, PROMPTS, params, vocab_size=VOCAB)]
    params.seed = 8
    assert first != [g.tokens for g in generate(lm, PROMPTS, params, vocab_size=VOCAB)]


def test_top_k_1_and_tiny_top_p_are_greedy():
    lm = _random_llama()
    greedy = generate(lm, PROMPTS, _greedy(12), vocab_size=VOCAB)
    for params in (SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=0),
                   SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=0)):
        assert [g.tokens for g in generate(lm, PROMPTS, params, vocab_size=VOCAB)] == [g.tokens for g in greedy]


def test_process_logits_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: torch.isfinite(process_logits(logits, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert keep(top_p=0.5) == [True, False, False, False]
    assert keep(top_p=0.81) == [True, True, True, False]
    seen = torch.tensor([[True, False, False, True]])
    out = process_logits(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), SamplingParams(temperature=0, repetition_penalty=2.0),
                         seen)
    assert out.tolist() == [[1.0, 1.0, 0.5, -2.0]]
    samples = torch.tensor([[0.0, 1.0]]).repeat(4000, 1)
    drawn = torch.multinomial(process_logits(samples, SamplingParams(temperature=0.5)).softmax(-1), 1,
                              generator=torch.Generator().manual_seed(0))
    assert abs(drawn.float().mean().item() - torch.sigmoid(torch.tensor(2.0)).item()) < 0.03  # softmax(x / 0.5)


def test_pad_rows_of_the_vocabulary_are_never_chosen():
    lm = _random_llama()
    with torch.no_grad():
        lm.layers[-1].mlp.linear_fc2.bias = None
        lm.final_layernorm.weight.fill_(-1.0)  # every real logit negative: the zero pad logits would win
    out = generate(lm, [PROMPTS[0]], _greedy(8), vocab_size=VOCAB)[0]
    assert all(t < VOCAB for t in out.tokens)


def test_stop_tokens_and_strings():
    lm = _random_llama()
    free = generate(lm, [PROMPTS[0]], _greedy(12), vocab_size=VOCAB)[0].tokens
    stop = free[5]
    first = free.index(stop)
    out = generate(lm, [PROMPTS[0]], _greedy(12, stop_token_ids=[stop]), vocab_size=VOCAB)[0]
    assert out.tokens == free[:first] and out.finish_reason == "stop_token"
    out = generate(lm, [PROMPTS[0]], _greedy(12), vocab_size=VOCAB, eod=stop)[0]
    assert out.tokens == free[:first]
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    out = generate(lm, [PROMPTS[0]], _greedy(12, stop_strings=[f"<{free[3]}>"]), vocab_size=VOCAB, decode=decode)[0]
    cut = free.index(free[3])
    assert out.finish_reason == "stop_string" and out.tokens == free[:cut + 1]
    assert out.text == decode(free[:cut])
    assert generate(lm, [PROMPTS[0]], _greedy(12), vocab_size=VOCAB)[0].finish_reason == "length"


def test_streaming_calls_back_every_token_in_order():
    lm = _random_llama()
    seen, written = [], []
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    streamer = TextStreamer(decode, written.append)
    out = generate(lm, [PROMPTS[1]], _greedy(10), vocab_size=VOCAB, decode=decode,
                   on_token=lambda row, tok: (seen.append(tok), streamer(row, tok)))[0]
    assert seen == out.tokens and "".join(written) == out.text
    assert isinstance(out, Generation)


def test_learned_positions_refuse_to_run_past_the_table(tmp_path):
    from megalm.config import ModelConfig
    from megalm.model import GPTModel
    model = GPTModel(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16,
                                 padded_vocab_size=128)).eval()
    with pytest.raises(ValueError, match="longer than the model's 16 positions"):
        generate(model, [[1] * 10], _greedy(10))


def _random_llama():
    from megalm.config import ModelConfig
    from megalm.model import GPTModel
    torch.manual_seed(0)
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=64,
                         position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                         add_bias_linear=True, init_method_std=0.1, attention_dropout=0.0, hidden_dropout=0.0,
                         padded_vocab_size=128)
    return GPTModel(config).eval()


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A megalm checkpoint (converted from a random HF Llama) with a real tokenizer."""
    from megalm.convert import hf_to_megalm
    root = tmp_path_factory.mktemp("gen-cli")
    hf_dir = save_hf(hf_model("llama", vocab_size=320), str(root / "hf"))
    write_tokenizer(hf_dir)
    hf_to_megalm(hf_dir, str(root / "megalm"), **quiet())
    return str(root / "megalm")


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_streams_one_prompt_and_batches_several(text_checkpoint, tmp_path):
    r = _cli("--load", text_checkpoint, "--prompt", "def wrap(text", "--max-new-tokens", "12", "--greedy")
    assert r.returncode == 0, r.stderr
    lm = load_model(text_checkpoint, device="cpu")
    expected = generate(lm.model, [lm.tokenizer.encode("def wrap(text")], _greedy(12), vocab_size=lm.vocab_size,
                        eod=lm.tokenizer.eod, decode=lm.tokenizer.decode)[0].text
    assert r.stdout == "def wrap(text" + expected + "\n"
    assert "tokens/s" in r.stderr

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass TextWrapper:\n")
    r = _cli("--load", text_checkpoint, "--prompt-file", str(prompts), "--max-new-tokens", "8",
             "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("=== 0 ===\nimport os") and "=== 1 ===\nclass TextWrapper:" in r.stdout
    again = _cli("--load", text_checkpoint, "--prompt-file", str(prompts), "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3")
    assert again.stdout == r.stdout

    r = _cli("--load", str(tmp_path / "nothing"), "--prompt", "x")
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_cli_says_why_generation_stopped(text_checkpoint):
    """Under the text, stderr names the reason in the flags' own words; a batch names each prompt's
    reason when they differ."""
    lm = load_model(text_checkpoint, device="cpu")
    prompts = ["def wrap(text", "import os"]
    free = [generate(lm.model, [lm.tokenizer.encode(p)], _greedy(6), vocab_size=lm.vocab_size, eod=lm.tokenizer.eod,
                     decode=lm.tokenizer.decode)[0] for p in prompts]
    assert [f.finish_reason for f in free] == ["length", "length"] and free[0].text.strip()
    stop_id = next((t for t in free[0].tokens if t not in free[1].tokens), None)
    assert stop_id is not None

    def reason(*flags):
        r = _cli("--load", text_checkpoint, "--max-new-tokens", "6", "--greedy", *flags)
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[-1].startswith("(generated ") and "tokens/s)" in r.stderr
        return r.stderr.splitlines()[-2]

    one = ("--prompt", prompts[0])
    assert reason(*one) == "(stopped: reached --max-new-tokens 6)"
    assert reason(*one, "--stop-token-id", str(stop_id)) == "(stopped: end of text or a --stop-token-id)"
    assert reason(*one, "--stop", free[0].text.strip()[0]) == "(stopped: found a --stop string)"
    assert reason(*one, "--prompt", prompts[1], "--stop-token-id", str(stop_id)) == (
        "(stopped: prompt 0: end of text or a --stop-token-id; prompt 1: reached --max-new-tokens 6)")


def test_cli_warns_in_one_line_past_a_rope_models_positions(text_checkpoint):
    lm = load_model(text_checkpoint, device="cpu")
    positions = lm.config.model.max_positions
    assert lm.config.model.position_embedding_type == "rope"
    r = _cli("--load", text_checkpoint, "--prompt", "def wrap(text", "--max-new-tokens", str(positions + 4),
             "--greedy")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"trained with {positions} positions" in warnings[0], r.stderr
    assert "UserWarning" not in r.stderr
