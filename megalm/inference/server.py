"""The OpenAI-compatible HTTP API over an `Engine`, as a FastAPI application.

    POST /v1/completions       prompt (text, texts, token ids) -> text
    POST /v1/chat/completions  messages -> the assistant's reply (the tokenizer's chat template)
    GET  /v1/models            the one model served
    GET  /health               200 while the engine runs, with its queue lengths

Request fields follow OpenAI's: model, max_tokens (max_completion_tokens), temperature, top_p, n,
stop, seed, stream (+ stream_options.include_usage), logprobs (completions: the number of likeliest
tokens to list, up to 20; chat: true with top_logprobs), plus top_k as vLLM takes it. A streamed
response is server-sent events, `data: {json}` each, then `data: [DONE]`.

Every refusal is an OpenAI error body, {"error": {"message", "type", "code"}}: 400 for malformed
JSON, a field of the wrong type or range, a field this server does not support (echo, best_of,
penalties, logit_bias, suffix), or a prompt that does not fit the context; 404 for an
unknown model or path; 429 when the wait queue is full; 500 when the model fails a step. A client
that goes away (a closed stream, or a dropped connection while it waits) aborts its requests and
frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from fastapi import Request as HTTPRequest

from megalm.inference.engine import Engine, Output, QueueFull, Request
from megalm.inference.generate import SamplingParams

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """What the API needs besides the engine."""
    name: str
    tokenizer: object  # megalm.data.tokenizer.Tokenizer
    max_positions: int
    chat_templates: dict  # name -> megalm.data.chat.ChatTemplate
    created: int = 0


# ---- request fields -------------------------------------------------------------------------------

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _field(body: dict, name: str, kind, default=None, low=None, high=None):
    """body[name] checked to be of `kind` (int also accepted for float) and within [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(isinstance(value, k) and not (isinstance(value, bool) and k is not bool) for k in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise APIError(400, f"'{name}' must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, "
                            f"got {json.dumps(value)[:50]}", param=name)
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def _check_unsupported(body: dict) -> None:
    """Fields this server would otherwise ignore while the client counts on them."""
    asked = [name for name, off in (("echo", False), ("best_of", 1), ("presence_penalty", 0),
                                    ("frequency_penalty", 0), ("logit_bias", {}), ("suffix", ""))
             if body.get(name) not in (None, off)]
    if asked:
        raise APIError(400, f"'{asked[0]}' is not supported by this server: send the request without it",
                       param=asked[0])


def _stop_strings(body: dict) -> list:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop")
    return [s for s in stop if s]


def _sampling(body: dict, max_tokens: int, stop_token_ids=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=_field(body, "temperature", float, 1.0, 0.0, 2.0),
                          top_p=_field(body, "top_p", float, 1.0, 0.0, 1.0) or 1e-6,
                          top_k=max(_field(body, "top_k", int, 0, -1), 0),
                          seed=_field(body, "seed", int), stop_strings=_stop_strings(body),
                          stop_token_ids=list(stop_token_ids))


def _max_tokens(body: dict, prompt_tokens: int, max_positions: int, default: Optional[int]) -> int:
    """max_tokens (or max_completion_tokens) checked against the context left after the prompt."""
    room = max_positions - prompt_tokens
    asked = _field(body, "max_tokens", int, None, 0)
    asked = _field(body, "max_completion_tokens", int, asked, 0)
    if room <= 0 or asked is not None and asked > room:
        wanted = prompt_tokens + (asked or 0)
        raise APIError(400, f"this model's maximum context length is {max_positions} tokens, and {wanted} were asked "
                            f"for ({prompt_tokens} in the prompt, {asked or 0} for the completion): shorten the prompt "
                            f"or lower max_tokens", code="context_length_exceeded", param="max_tokens")
    if asked is not None:
        return asked
    return room if default is None else min(default, room)


# ---- the application ------------------------------------------------------------------------------


def build_app(engine: Engine, served: ServedModel):
    """The FastAPI application; the engine's loop runs while the application does (its lifespan)."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()  # after the server has answered every request in flight

    app = FastAPI(title="megalm", lifespan=lifespan)
    served.created = served.created or int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):  # a bug here must still answer in the API's shape
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"the server failed on this request: {type(e).__name__}: {e}",
                                     "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _json_body(request)
        _check_model(body, served)
        prompts = _completion_prompts(body, served.tokenizer)
        logprobs = _field(body, "logprobs", int, None, 0, MAX_LOGPROBS)
        _check_unsupported(body)
        jobs = [(p, _sampling(body, _max_tokens(body, len(p), served.max_positions, 16))) for p in prompts]
        call = _Call(engine, served, "cmpl", body, jobs, logprobs, chat=False)
        return await call.respond(request, JSONResponse, StreamingResponse)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _json_body(request)
        _check_model(body, served)
        _check_unsupported(body)
        prompt = _chat_prompt(body, served)
        logprobs = None
        if _field(body, "logprobs", bool, False):
            logprobs = _field(body, "top_logprobs", int, 0, 0, MAX_LOGPROBS)
        stops = _chat_stop_tokens(served)
        jobs = [(prompt, _sampling(body, _max_tokens(body, len(prompt), served.max_positions, None), stops))]
        call = _Call(engine, served, "chatcmpl", body, jobs, logprobs, chat=True)
        return await call.respond(request, JSONResponse, StreamingResponse)

    return app


async def _json_body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "megalm",
            "max_model_len": served.max_positions}


def _check_model(body: dict, served: ServedModel) -> None:
    name = _field(body, "model", str)
    if name is None:
        raise APIError(400, f"'model' is required: this server serves {served.name!r}", param="model")
    if name != served.name:
        raise APIError(404, f"the model {name!r} does not exist: this server serves {served.name!r}",
                       code="model_not_found", param="model")


def _completion_prompts(body: dict, tokenizer) -> list:
    """'prompt' as token-id lists: a string, an array of strings, an array of ids or of id arrays."""
    prompt = body.get("prompt")
    vocab = tokenizer.vocab_size

    def ids(value):
        if isinstance(value, str):
            encoded = tokenizer.encode(value)
        elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if any(not 0 <= t < vocab for t in value):
                raise APIError(400, f"'prompt' holds a token id outside the vocabulary [0, {vocab})", param="prompt")
            encoded = list(value)
        else:
            raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array "
                                "of token id arrays", param="prompt")
        if not encoded:
            raise APIError(400, "'prompt' is empty: give at least one token of text", param="prompt")
        return encoded

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [ids(p) for p in prompt]
    return [ids(prompt)]


def _chat_prompt(body: dict, served: ServedModel) -> list:
    from megalm.data.chat import select_template
    from megalm.data.errors import DataError

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {\"role\", \"content\"} objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones can be read by this model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            m["content"] = "".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts", param="messages")
    tools = _field(body, "tools", list)
    try:
        template = select_template(served.chat_templates, tools)
        text = template.render(messages, tools, add_generation_prompt=True, where="the request's messages")
    except DataError as e:
        raise APIError(400, str(e), param="messages") from None
    return served.tokenizer.encode(text)


def _chat_stop_tokens(served: ServedModel) -> list:
    """The end-of-turn tokens of the chat template (ChatML's <|im_end|>, Llama 3's <|eot_id|>, ...)."""
    templates = served.chat_templates.values()
    texts = " ".join(t.text for t in templates)
    markers = [m for m in END_OF_TURN_MARKERS if m in texts] + [t.special_tokens.get("eos_token") for t in templates]
    found = [served.tokenizer.encode(m) for m in markers if m]
    return sorted({ids[0] for ids in found if len(ids) == 1})


class _Call:
    """One API call: its engine requests (prompts x n), their outputs gathered into OpenAI's shapes."""

    def __init__(self, engine: Engine, served: ServedModel, prefix: str, body: dict, jobs: list,
                 logprobs: Optional[int], chat: bool):
        self.engine, self.served, self.chat, self.logprobs = engine, served, chat, logprobs
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, {})
        self.include_usage = bool(options.get("include_usage"))
        n = _field(body, "n", int, 1, 1, 16)
        self.choices = []  # (index, prompt, params)
        for prompt, params in jobs:
            for i in range(n):
                seed = params.seed + i if params.seed is not None else None
                choice = SamplingParams(**{**params.__dict__, "seed": seed})
                self.choices.append((len(self.choices), prompt, choice))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = set()

    def _submit(self) -> None:
        mailbox = _Mailbox.of(asyncio.get_running_loop())
        for index, prompt, params in self.choices:
            def emit(out, index=index):
                mailbox.post(self.queue, (index, out))
            request_id = f"{self.id}-{index}"
            try:
                self.engine.submit(Request(request_id, prompt, params, emit, self.logprobs))
            except QueueFull as e:
                self._abort()
                raise APIError(429, str(e), "rate_limit_error", "rate_limit_exceeded") from None
            except ValueError as e:
                self._abort()
                raise APIError(400, str(e)) from None
            self.open.add(index)

    def _abort(self) -> None:
        for index in self.open:
            self.engine.abort(f"{self.id}-{index}")
        self.open.clear()

    async def respond(self, request, json_response, streaming_response):
        self._submit()
        if self.stream:
            return streaming_response(self._events(), media_type="text/event-stream")
        try:
            return json_response(await self._whole(request))
        finally:
            self._abort()

    async def _next(self, request=None):
        """The next (index, Output); while waiting, a dropped connection (of `request`) aborts the call."""
        if request is None:
            return await self.queue.get()
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise APIError(499, "the client closed the connection") from None

    async def _whole(self, request) -> dict:
        texts = {i: [] for i, _, _ in self.choices}
        logprobs = {i: [] for i, _, _ in self.choices}
        finish, usage = {}, _Usage()
        while self.open:
            index, out = await self._next(request)
            self._check_failed(out)
            texts[index].append(out.text)
            logprobs[index] += out.logprobs
            if out.finish_reason is not None:
                self.open.discard(index)
                finish[index] = out.finish_reason
                usage.add(self.choices[index][1], out)
        choices = []
        for index, _, _ in self.choices:
            text = "".join(texts[index])
            choice = {"index": index, "finish_reason": finish[index],
                      "logprobs": self._logprobs(logprobs[index], 0)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.served.name, "choices": choices, "usage": usage.dict()}

    async def _events(self):
        usage = _Usage()
        offsets = {i: 0 for i, _, _ in self.choices}
        try:
            if self.chat:
                for index, _, _ in self.choices:
                    yield self._chunk(index, {"role": "assistant", "content": ""}, None, None)
            while self.open:
                index, out = await self._next()
                if out.finish_reason is not None:
                    self.open.discard(index)
                    usage.add(self.choices[index][1], out)
                if out.finish_reason == "error":
                    yield _sse({"error": APIError(500, f"the model failed: {out.error}", "server_error").body()["error"]})
                    break
                if out.text or out.finish_reason is not None or out.logprobs:
                    lp = self._logprobs(out.logprobs, offsets[index])
                    offsets[index] += len(out.text)
                    yield self._chunk(index, {"content": out.text} if out.text or not self.chat else {},
                                      out.finish_reason, lp)
            if self.include_usage:
                yield _sse({"id": self.id, "object": self._chunk_object(), "created": self.created,
                            "model": self.served.name, "choices": [], "usage": usage.dict()})
            yield "data: [DONE]\n\n"
        finally:
            self._abort()  # the client went away: free the slots of what is still running

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, delta: dict, finish: Optional[str], logprobs) -> str:
        choice = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        return _sse({"id": self.id, "object": self._chunk_object(), "created": self.created,
                     "model": self.served.name, "choices": [choice]})

    def _check_failed(self, out: Output) -> None:
        if out.finish_reason == "error":
            self._abort()
            raise APIError(500, f"the model failed: {out.error}", "server_error")

    def _logprobs(self, entries: list, text_offset: int):
        """OpenAI's logprobs object of some tokens: the chat shape or the completions shape."""
        if self.logprobs is None:
            return None
        piece = self.served.tokenizer.decode
        if self.chat:
            def item(token, logprob):
                text = piece([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(t, lp), "top_logprobs": [item(u, ulp) for u, ulp in top]}
                                for t, lp, top in entries]}
        tokens = [piece([t]) for t, _, _ in entries]
        offsets = []
        for text in tokens:
            offsets.append(text_offset)
            text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{piece([u]): ulp for u, ulp in top} for _, _, top in entries],
                "text_offset": offsets}


class _Mailbox:
    """Outputs from the engine's thread to one event loop's queues: one wake-up of the loop per batch of
    outputs (a step's), not one per token."""
    _of_loop: dict = {}

    def __init__(self, loop):
        self.loop, self.pending, self.lock, self.scheduled = loop, [], threading.Lock(), False

    @classmethod
    def of(cls, loop) -> "_Mailbox":
        if loop not in cls._of_loop:
            cls._of_loop = {k: v for k, v in cls._of_loop.items() if not k.is_closed()}
            cls._of_loop[loop] = cls(loop)
        return cls._of_loop[loop]

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, item in pending:
            queue.put_nowait(item)


class _Usage:
    def __init__(self):
        self.prompt = self.completion = 0
        self._prompts = set()

    def add(self, prompt: list, out: Output) -> None:
        if id(prompt) not in self._prompts:  # n choices of one prompt count its tokens once
            self._prompts.add(id(prompt))
            self.prompt += out.prompt_tokens
        self.completion += out.completion_tokens

    def dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def make_server(loaded, name: Optional[str] = None, chat_template: Optional[str] = None, max_num_seqs: int = 16,
                max_num_batched_tokens: Optional[int] = None, kv_cache_tokens: Optional[int] = None,
                block_size: int = 16, max_queue: int = 64, parallel=None) -> tuple:
    """(Engine, ServedModel) for a `megalm.inference.loading.LoadedModel` with a tokenizer.

    Defaults: a prefill step takes up to one full context; the cache holds a full context for every
    sequence that may run (`max_num_seqs` x the model's positions). `parallel`: the tensor-parallel
    state the model was loaded with.
    """
    import os

    from megalm.data.chat import load_chat_templates, tokenizer_directory

    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.path} has no tokenizer: serving text needs one (train or convert with "
                         f"--tokenizer-model)")
    positions = loaded.config.model.max_positions
    engine = Engine(loaded.model, loaded.vocab_size, loaded.tokenizer.decode, loaded.tokenizer.eod,
                    max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens or positions,
                    kv_cache_tokens=kv_cache_tokens or max_num_seqs * positions, block_size=block_size,
                    max_queue=max_queue, parallel=parallel)
    templates = load_chat_templates(tokenizer_directory(loaded.config.data), loaded.tokenizer, chat_template)
    served = ServedModel(name or os.path.basename(os.path.normpath(loaded.path)), loaded.tokenizer, positions,
                         templates)
    return engine, served
