"""Serving: the paged KV cache, the continuous-batching engine, and the OpenAI API over HTTP (the real
`openai` client against a server on 127.0.0.1): outputs equal greedy `generate`, alone or batched."""

import asyncio
import json
import os
import socket
import sys
import threading
import time

import pytest
import torch

from megalm.config import Config, DataConfig, ModelConfig
from megalm.inference.engine import Engine, QueueFull, Request
from megalm.inference.generate import SamplingParams, generate
from megalm.inference.paged_cache import BlockAllocator, CacheExhausted, PagedKVCache

openai = pytest.importorskip("openai", reason="the API is checked with the openai client (requirements-dev.txt)")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from test_sft_data import write_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The user asks", "What is the capital of France? Paris", "A spider", "Tell me a joke about numbers: seven",
           "You may call tools to get the weather. How many legs"]


def _tiny_config(**kw):
    return ModelConfig(**{**dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                 ffn_hidden_size=128, seq_length=256, position_embedding_type="rope",
                                 normalization="RMSNorm", swiglu=True, add_bias_linear=False, init_method_std=0.1,
                                 attention_dropout=0.0, hidden_dropout=0.0, padded_vocab_size=512), **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is much faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny random GQA / RoPE model saved as a megalm checkpoint with a ChatML tokenizer, loaded back."""
    from megalm.checkpoint import save_checkpoint
    from megalm.inference.loading import load_model
    from megalm.model import GPTModel
    root = tmp_path_factory.mktemp("serve")
    tok_dir = write_tokenizer(root / "tok")
    torch.manual_seed(0)
    config = _tiny_config()
    data = DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=os.path.join(tok_dir, "tokenizer.json"))
    save_checkpoint(str(root / "tiny"), 1, GPTModel(config), Config(model=config, data=data))
    return load_model(str(root / "tiny"), device="cpu")


def _solo(lm, prompt_ids, n, stop_token_ids=()):
    """Greedy `generate` of one prompt alone: (text, completion tokens counted as the API counts them)."""
    g = generate(lm.model, [prompt_ids], SamplingParams(max_new_tokens=n, temperature=0.0,
                                                        stop_token_ids=stop_token_ids),
                 vocab_size=lm.vocab_size, eod=lm.tokenizer.eod, decode=lm.tokenizer.decode)[0]
    return g.text, len(g.tokens) + (g.finish_reason == "stop_token")


class ServerThread:
    """A uvicorn server of the app on a free loopback port, in a thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _serve(lm, **kw):
    from megalm.inference.server import build_app, make_server
    engine, served = make_server(lm, name="tiny", **kw)
    return engine, served, ServerThread(build_app(engine, served))


@pytest.fixture(scope="module")
def server(loaded):
    # Room for 4 sequences of 64 tokens: 16 requests of up to ~50 tokens each must take turns.
    engine, served, thread = _serve(loaded, max_num_seqs=8, kv_cache_tokens=256, block_size=8, max_queue=32)
    yield engine, served, thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[2].url + "/v1", api_key="none", max_retries=0, timeout=60)


# ---- the paged cache and the engine -------------------------------------------------------------


def test_block_allocator_allocates_frees_and_runs_out():
    blocks = BlockAllocator(3)
    taken = [blocks.allocate() for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and blocks.num_free == 0
    with pytest.raises(CacheExhausted, match="all 3 KV cache blocks are in use"):
        blocks.allocate()
    blocks.free([taken[1]])
    assert blocks.allocate() == taken[1]
    with pytest.raises(ValueError, match="not an allocated block"):
        blocks.free([7])


def test_paged_cache_reserves_whole_blocks_all_or_none():
    cache = PagedKVCache(_tiny_config(), num_blocks=4, block_size=4)
    cache.reserve("a", 5)  # 2 blocks
    assert len(cache.tables["a"]) == 2 and cache.blocks_needed("a", 8) == 0 and cache.blocks_needed("a", 9) == 1
    with pytest.raises(CacheExhausted, match="3 more KV cache blocks are needed and 2 are free"):
        cache.reserve("b", 9)
    assert "b" not in cache.tables or cache.tables["b"] == [] and cache.allocator.num_free == 2
    cache.release("a")
    assert cache.allocator.num_free == 4 and cache.peak_blocks == 2


def test_paged_batch_logits_equal_the_model_alone():
    """Prompts of different lengths prefilled in one step, then one decode step, then decode tokens
    packed with a new prompt: each token's hidden state equals the model's on its sequence alone (GQA,
    RoPE positions counted per sequence)."""
    from megalm.model import GPTModel
    torch.manual_seed(0)
    model = GPTModel(_tiny_config()).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 30, 40, 50, 60]]
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    tokens = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
        cache.reserve(i, len(p) + 1)
    with torch.no_grad():
        h = model.hidden_states(tokens, cache.batch([0, 1, 2], [len(p) for p in prompts]))
        step = model.hidden_states(torch.tensor([[1], [2], [3]]), cache.batch([0, 1, 2], [1, 1, 1]))[:, 0]
        # Packed: sequences 0 and 1 decode one more token while sequence 3's prompt is prefilled.
        late = [9, 8, 7, 6]
        cache.reserve(0, 1)
        cache.reserve(1, 1)
        cache.reserve(3, len(late))
        packed = model.hidden_states(torch.tensor([[4, 5] + late]), cache.batch([0, 1, 3], [1, 1, 4], packed=True))[0]
        for i, p in enumerate(prompts):
            alone = model.hidden_states(torch.tensor([p + [i + 1]]))[0]
            assert (h[i, :len(p)] - alone[:len(p)]).abs().max() < 1e-5
            assert (step[i] - alone[-1]).abs().max() < 1e-5
        for row, full in ((0, prompts[0] + [1, 4]), (1, prompts[1] + [2, 5])):
            assert (packed[row] - model.hidden_states(torch.tensor([full]))[0, -1]).abs().max() < 1e-5
        assert (packed[2:] - model.hidden_states(torch.tensor([late]))[0]).abs().max() < 1e-5


def _run(engine, requests):
    """Submit requests and step the engine (no thread) until all are done; {id: [outputs]}."""
    outputs = {r.id: [] for r in requests}
    for r in requests:
        r.emit = outputs[r.id].append
        engine.submit(r)
    for _ in range(5000):
        if not engine.has_work():
            return outputs
        engine.step()
    raise AssertionError(f"the engine did not finish: {engine.num_running} running, {engine.num_waiting} waiting")


def test_engine_batches_within_its_caps_and_preempts_without_changing_greedy_output(loaded):
    """8 requests, 3 sequences at most, a cache too small for all three to finish together: each
    output still equals its solo greedy run."""
    tok = loaded.tokenizer
    engine = Engine(loaded.model, loaded.vocab_size, tok.decode, None, max_num_seqs=3, kv_cache_tokens=64,
                    block_size=4, max_queue=8)
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode("The"), tok.encode("capital"), tok.encode("seven ate")]
    requests = [Request(str(i), p, SamplingParams(max_new_tokens=12 + 2 * i, temperature=0.0), None)
                for i, p in enumerate(prompts)]
    outputs = _run(engine, requests)
    for r, p in zip(requests, prompts):
        g = generate(loaded.model, [p], r.params, vocab_size=loaded.vocab_size, decode=tok.decode)[0]
        assert "".join(o.text for o in outputs[r.id]) == g.text
        assert outputs[r.id][-1].finish_reason == "length" and outputs[r.id][-1].completion_tokens == len(g.tokens)
    assert engine.peak_running == 3 and engine.preemptions > 0 and engine.packed_steps > 0
    assert engine.peak_cached_tokens <= 64 and engine.cache.used_blocks == 0


def test_a_preempted_sequence_longer_than_the_step_budget_still_finishes(loaded):
    tok = loaded.tokenizer
    engine = Engine(loaded.model, loaded.vocab_size, tok.decode, None, max_num_seqs=2, max_num_batched_tokens=8,
                    kv_cache_tokens=32, block_size=4)
    prompts = [tok.encode("The user asks a"), tok.encode("A spider has eight")]
    assert all(len(p) <= 8 for p in prompts)
    requests = [Request(str(i), p, SamplingParams(max_new_tokens=14, temperature=0.0), None)
                for i, p in enumerate(prompts)]
    outputs = _run(engine, requests)
    assert engine.preemptions > 0
    for r, p in zip(requests, prompts):
        g = generate(loaded.model, [p], r.params, vocab_size=loaded.vocab_size, decode=tok.decode)[0]
        assert "".join(o.text for o in outputs[r.id]) == g.text


def test_engine_queue_bound_and_abort_free_the_slots(loaded):
    engine = Engine(loaded.model, loaded.vocab_size, loaded.tokenizer.decode, None, max_num_seqs=1,
                    kv_cache_tokens=64, block_size=4, max_queue=1)
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    engine.submit(Request("a", [1, 2, 3], params, lambda out: None))
    engine.step()  # "a" runs
    engine.submit(Request("b", [1, 2], params, lambda out: None))  # waits
    with pytest.raises(QueueFull, match="1 requests running and 1 waiting"):
        engine.submit(Request("c", [1], params, lambda out: None))
    with pytest.raises(ValueError, match="needs 94 tokens of KV cache and it holds 64"):
        engine.check(64, 30)
    engine.abort("a")
    engine.abort("b")
    engine.step()
    assert engine.num_running == engine.num_waiting == 0 and engine.cache.used_blocks == 0


def test_sampling_is_per_request_and_seeded(loaded):
    engine = Engine(loaded.model, loaded.vocab_size, loaded.tokenizer.decode, None, max_num_seqs=4)
    prompt = loaded.tokenizer.encode("A spider")
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, seed=3)
    requests = [Request("s1", prompt, sampled, None), Request("g", prompt, SamplingParams(16, temperature=0.0), None),
                Request("s2", prompt, sampled, None),
                Request("s3", prompt, SamplingParams(16, temperature=1.0, top_k=50, seed=4), None)]
    out = {k: [t for o in v for t in o.token_ids] for k, v in _run(engine, requests).items()}
    assert out["s1"] == out["s2"] != out["s3"]
    greedy = generate(loaded.model, [prompt], SamplingParams(16, temperature=0.0), vocab_size=loaded.vocab_size)
    assert out["g"] == greedy[0].tokens


# ---- the HTTP API --------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(server[2].url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_greedy_generate(loaded, client, stream):
    prompt = PROMPTS[1]
    expected, count = _solo(loaded, loaded.tokenizer.encode(prompt), 20)
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        text, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    assert text == expected
    assert finish == ("length" if count == 20 else "stop")
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(loaded.tokenizer.encode(prompt)), count)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_equals_tools_generate_py(loaded, client):
    import subprocess
    prompt = PROMPTS[0]
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate.py"), "--load", loaded.path,
                        "--prompt", prompt, "--max-new-tokens", "16", "--greedy", "--no-stream"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    served = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert r.stdout == prompt + served.choices[0].text + "\n"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_equals_greedy_generate_of_the_templated_prompt(loaded, server, client, stream):
    from megalm.data.chat import select_template
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "A spider has"}]
    templated = select_template(server[1].chat_templates, None).render(messages, add_generation_prompt=True)
    im_end = loaded.tokenizer.encode("<|im_end|>")
    assert len(im_end) == 1
    expected, count = _solo(loaded, loaded.tokenizer.encode(templated), 24, stop_token_ids=im_end)
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        text = r.choices[0].message.content
        assert r.usage.prompt_tokens == len(loaded.tokenizer.encode(templated)) and r.usage.completion_tokens == count
    assert text == expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text_and_are_held_back_while_streaming(loaded, client, stream):
    prompt = PROMPTS[2]
    full, _ = _solo(loaded, loaded.tokenizer.encode(prompt), 30)
    stop = full[6:9]
    assert stop and full.find(stop) >= 1
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                                stop=[stop, "never appears"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=stop)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == (full[:full.find(stop)], "stop")


def test_n_seed_and_logprobs(loaded, client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, seed=5, n=2,
                                  logprobs=3)
    again = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, seed=5, n=2,
                                      logprobs=3)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, seed=5,
                                           n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == len(loaded.tokenizer.encode(PROMPTS[3]))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    assert "".join(lp.tokens) == r.choices[0].text and all(len(top) == 3 for top in lp.top_logprobs)
    assert all(lp_ <= 0 for lp_ in lp.token_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(t.logprob == max(u.logprob for u in t.top_logprobs) for t in content)


def test_sixteen_concurrent_requests_each_equal_their_solo_run(loaded, server, client):
    engine = server[0]
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    lengths = [8 + 3 * i for i in range(16)]
    aclient = openai.AsyncOpenAI(base_url=server[2].url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def ask_all():
        return await asyncio.gather(*(aclient.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0)
                                      for p, n in zip(prompts, lengths)))

    answers = asyncio.run(ask_all())
    for prompt, n, answer in zip(prompts, lengths, answers):
        assert answer.choices[0].text == _solo(loaded, loaded.tokenizer.encode(prompt), n)[0]
    assert engine.peak_running > 1  # they were batched
    assert engine.peak_cached_tokens <= engine.cache.capacity == 256
    assert sum(len(loaded.tokenizer.encode(p)) + n for p, n in zip(prompts, lengths)) > 256  # paging mattered
    assert engine.num_running == engine.num_waiting == 0 and engine.cache.used_blocks == 0


BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("not an object", "/v1/completions", b'[1, 2]', 400, "must be a JSON object"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "'gpt-9' does not exist"),
    ("no model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
    ("negative max_tokens", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400,
     "'max_tokens' must be at least 0"),
    ("prompt past the context", "/v1/completions", {"model": "tiny", "prompt": "seven ate nine " * 200}, 400,
     "maximum context length is 256 tokens"),
    ("max_tokens past the context", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1000}, 400,
     "maximum context length"),
    ("temperature as text", "/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400,
     "'temperature' must be a number"),
    ("prompt as a number", "/v1/completions", {"model": "tiny", "prompt": 5}, 400, "'prompt' must be a string"),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "'prompt' is empty"),
    ("token id past the vocabulary", "/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400,
     "outside the vocabulary"),
    ("n of zero", "/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "'n' must be between 1"),
    ("stop of numbers", "/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [1]}, 400, "'stop' must be"),
    ("messages as text", "/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "'messages' must be"),
    ("a role the template rejects", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role wizard"),
    ("a penalty this server does not apply", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400,
     "'presence_penalty' is not supported"),
    ("unknown path", "/v1/embeddings", {"model": "tiny", "input": "hi"}, 404, "Not Found"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    for what, path, body, status, message in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server[2].url + path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, (what, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["type"], (what, error)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="hi")
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0).choices[0].text


def test_a_failure_inside_the_server_is_a_500_in_the_api_shape(server, client, monkeypatch):
    class Broken:
        vocab_size = 10

        def encode(self, text):
            raise RuntimeError("tokenizer broke")

    with monkeypatch.context() as patch:
        patch.setattr(server[1], "tokenizer", Broken())
        r = httpx.post(server[2].url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "RuntimeError: tokenizer broke" in r.json()["error"]["message"]
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).choices[0].text


def test_full_queue_gets_429_and_a_disconnect_frees_its_slot(loaded):
    engine, _, thread = _serve(loaded, max_num_seqs=1, max_queue=0)
    try:
        body = {"model": "tiny", "prompt": "The", "max_tokens": 250, "temperature": 0, "stream": True}
        assert _solo(loaded, loaded.tokenizer.encode("The"), 250)[1] == 250  # no end-of-text before 250 tokens
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", thread.url + "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the response
                assert next(lines).startswith("data: {")  # the request is running
                r = httpx.post(thread.url + "/v1/completions", json={**body, "stream": False})
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
                assert "retry later" in r.json()["error"]["message"]
            # The stream is closed after a few tokens of 250: the engine drops the request.
        deadline = time.time() + 30
        while engine.num_running and time.time() < deadline:
            time.sleep(0.02)
        assert engine.num_running == 0 and engine.cache.used_blocks == 0 and engine.steps < 250
        r = httpx.post(thread.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        thread.stop()


def test_shutdown_finishes_the_requests_in_flight(loaded):
    """What SIGTERM does (uvicorn's should_exit): no new connections, the running request completes."""
    engine, _, thread = _serve(loaded, max_num_seqs=2)
    result = {}

    def ask():
        result["r"] = httpx.post(thread.url + "/v1/completions", timeout=60,
                                 json={"model": "tiny", "prompt": "The", "max_tokens": 200, "temperature": 0})

    asker = threading.Thread(target=ask)
    asker.start()
    while engine.num_running == 0 and asker.is_alive():
        time.sleep(0.005)
    thread.stop()
    asker.join()
    assert not thread.thread.is_alive()
    r = result["r"]
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == _solo(loaded, loaded.tokenizer.encode("The"), 200)[1]


def test_serve_tool_checks_its_flags(loaded, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import serve
    assert serve.main(["--load", loaded.path, "--max-num-seqs", "0"]) == 2
    assert "error: --max-num-seqs must be at least 1" in capsys.readouterr().err
    assert serve.main(["--load", loaded.path, "--quantize", "gptq-int4"]) == 2
    assert "error: --quantize gptq-int4 needs --calibration-input" in capsys.readouterr().err


def test_quantized_serving_equals_generate_of_the_quantized_model(loaded):
    """--quantize int8 through tools/serve.py's code: the engine's greedy text is the quantized
    model's own `generate` text."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import serve

    from megalm.inference.loading import load_model
    from megalm.model.quantized import QuantizedLinear
    args = serve.parse_args(["--load", loaded.path, "--quantize", "int8", "--device", "cpu"])
    quantized = load_model(loaded.path, device="cpu")
    serve.quantize_loaded(args, quantized)
    assert any(isinstance(m, QuantizedLinear) for m in quantized.model.modules())
    engine = Engine(quantized.model, quantized.vocab_size, quantized.tokenizer.decode, quantized.tokenizer.eod)
    prompts = [quantized.tokenizer.encode(p) for p in PROMPTS[:3]]
    requests = [Request(str(i), p, SamplingParams(max_new_tokens=12, temperature=0.0), None)
                for i, p in enumerate(prompts)]
    outputs = _run(engine, requests)
    for r, p in zip(requests, prompts):
        assert "".join(o.text for o in outputs[r.id]) == _solo(quantized, p, 12)[0]


def test_tensor_parallel_serving_under_torchrun_equals_one_process(loaded):
    """Two ranks (gloo), rank 0 serving: greedy text equal to `generate` on one process; SIGTERM
    lets the request in flight finish on both ranks, then every process exits."""
    import signal
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             os.path.join(REPO, "tools", "serve.py"), "--load", loaded.path, "--port", str(port),
                             "--served-model-name", "tiny", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        for prompt in PROMPTS[:2]:
            answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
            assert answer.choices[0].text == _solo(loaded, loaded.tokenizer.encode(prompt), 16)[0]
        result = {}
        asker = threading.Thread(target=lambda: result.update(r=client.completions.create(
            model="tiny", prompt="The", max_tokens=120, temperature=0)))
        asker.start()
        while httpx.get(url + "/health").json()["running"] == 0 and asker.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to both ranks
        asker.join()
        assert result["r"].usage.completion_tokens == 120
        output = proc.communicate(timeout=60)[0]
        assert "[rank" not in output and "RuntimeError" not in output, output[-3000:]  # no rank failed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
