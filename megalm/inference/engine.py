"""Continuous batching (Yu et al. 2022, Orca; vLLM's scheduler): one loop owns the model and runs
it step by step over whichever sequences are live.

Every step first reserves the next token's slot of each running sequence, then admits waiting
requests, then runs one forward: the running sequences' next tokens and the admitted prompts
together, packed into one row (`PagedBatch`) so that neither pads to the other; or, when that
packed step would be too large, the prompts alone, as one right-padded batch; or, with nothing
admitted, one decode token per running sequence as one batch. Between steps new requests join and
finished ones leave, so a short request never waits for a long one to end. Keys and values live in
a `PagedKVCache`: a sequence takes a block when its tokens reach it and frees its blocks when it
ends.

Limits: at most `max_num_seqs` sequences run at once; a prefill step takes at most
`max_num_batched_tokens` tokens (prompts plus decode tokens); the cache holds `num_blocks * block_size` tokens. A request
beyond them waits in a queue of at most `max_queue` requests (`QueueFull` past it). When a decode
step finds no free block for a running sequence, the most recently admitted sequence is preempted:
its blocks are freed and it returns to the head of the queue, to be prefilled again (prompt plus
what it generated) when blocks free up (vLLM's recompute preemption).

Each sequence samples with its own `SamplingParams` and its own seeded generator, through
`megalm.inference.generate`'s `process_logits` / `next_tokens`; greedy rows of a step are decided
together. The text of a sequence is decoded as it grows; text that could still be the start of a
stop string is held back until it no longer can, and the sequence ends before a stop string it
completes (the stop string itself is not returned). A stop token (the end-of-document token or one
of `stop_token_ids`) ends it too, and is counted but not returned.

`Output`s go to each request's `emit` callback, called on the engine thread.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megalm.inference.generate import SamplingParams, next_tokens, process_logits
from megalm.inference.paged_cache import CacheExhausted, PagedBatch, PagedKVCache, StepLayout
from megalm.parallel.mappings import gather_from_tensor_parallel_region
from megalm.parallel.tensor import vocab_parallel_logits

log = logging.getLogger(__name__)

MAX_PACKED_SCORES = 1 << 20  # query x key pairs of a packed step (per head), to bound its mask and scores


class QueueFull(RuntimeError):
    """The wait queue is at its bound: the request is refused (HTTP 429)."""


@dataclass
class Request:
    id: str
    prompt: list  # token ids
    params: SamplingParams
    emit: Callable[["Output"], None]
    logprobs: Optional[int] = None  # None: off; k: the chosen token's log-probability and the k likeliest


@dataclass
class Output:
    """What one step added to a request."""
    text: str = ""  # the new text (held-back text comes later)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per new token: (token, logprob, [(token, logprob)] top-k)
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or "error" on the last output
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Sequence:
    def __init__(self, request: Request, device):
        self.request = request
        self.tokens = list(request.prompt)  # prompt + generated, the model's input so far
        self.generated = []  # tokens of the completion (a stop token excluded)
        self.counted = 0  # completion tokens, a stop token included
        self.emitted = 0  # characters of the completion's text already sent
        self.finished = False
        self.unfinished_char = 0  # tokens in a row whose text ends in an incomplete character
        self.generator = None
        if not request.params.greedy:
            self.generator = torch.Generator(device=device)
            seed = request.params.seed
            self.generator.manual_seed(seed if seed is not None else int(torch.seed()))


class Engine:
    def __init__(self, model, vocab_size: int, decode: Callable[[list], str], eod: Optional[int] = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 2048, kv_cache_tokens: int = 16384,
                 block_size: int = 16, max_queue: int = 64, parallel=None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size)):
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if kv_cache_tokens < block_size:
            raise ValueError(f"--kv-cache-tokens {kv_cache_tokens} holds less than one block of {block_size} tokens")
        if max_queue < 0:
            raise ValueError(f"--max-queue must not be negative, got {max_queue}")
        self.model, self.vocab_size, self.decode, self.eod = model, vocab_size, decode, eod
        self.max_num_seqs, self.max_num_batched_tokens, self.max_queue = max_num_seqs, max_num_batched_tokens, max_queue
        weight = next(model.parameters())
        self.device = weight.device
        tp = parallel.tensor_model_parallel_size if parallel is not None else 1
        self.cache = PagedKVCache(model.config, kv_cache_tokens // block_size, block_size, self.device, weight.dtype,
                                  model.config.query_groups // tp)
        self.runner = ModelRunner(model, self.cache, vocab_size, parallel)
        self.waiting: collections.deque = collections.deque()  # _Sequence, admitted in order
        self.running: list = []
        self._aborted: set = set()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.steps = 0
        self.preemptions = 0
        self.peak_running = 0
        self.packed_steps = 0

    # ---- the client side (any thread) ----

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ValueError when a request of this size could never run on this engine."""
        needed = prompt_tokens + max_new_tokens
        if prompt_tokens > self.max_num_batched_tokens:
            raise ValueError(f"the prompt has {prompt_tokens} tokens and a prefill step takes at most "
                             f"{self.max_num_batched_tokens} (--max-num-batched-tokens): shorten the prompt")
        if needed > self.cache.capacity:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) needs {needed} "
                             f"tokens of KV cache and it holds {self.cache.capacity} (--kv-cache-tokens): "
                             f"ask for fewer tokens")

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when the wait queue is at its bound."""
        self.check(len(request.prompt), request.params.max_new_tokens)
        seq = _Sequence(request, self.device)
        with self._cond:
            if len(self.waiting) >= self.max_queue and len(self.running) + len(self.waiting) >= self.max_num_seqs:
                raise QueueFull(f"the server is at capacity: {len(self.running)} requests running and "
                                f"{len(self.waiting)} waiting (--max-queue {self.max_queue}); retry later")
            self.waiting.append(seq)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away) and free its slot at the next step."""
        with self._cond:
            self._aborted.add(request_id)
            self._cond.notify()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def peak_cached_tokens(self) -> int:
        """The most cache slots ever held by sequences (blocks x block size)."""
        return self.cache.peak_blocks * self.cache.block_size

    # ---- the loop ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="megalm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every request already accepted, then end the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self.runner.release_followers()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.has_work() and not self._stopping:
                    self._cond.wait()
                if not self.has_work():
                    return
            self.step()

    def step(self) -> None:
        """One scheduling step: aborts; the running sequences' next slots; admissions; then one forward."""
        self._take_aborts()
        preemptions = self.preemptions
        decoding = self._make_room()
        # After a preemption the cache is full: admitting now would only preempt again.
        admitted = self._admit(len(decoding)) if self.preemptions == preemptions else []
        batch, packed = decoding or admitted, False
        if admitted and decoding:
            if self._can_pack(decoding, admitted):
                batch, packed = decoding + admitted, True
                self.packed_steps += 1
            else:  # prefill alone this step; the running sequences keep their reserved slots for the next
                batch = admitted
        if not batch:
            return
        self.peak_running = max(self.peak_running, len(self.running))
        try:
            with torch.no_grad():
                logits = self._forward(batch, packed)
            self._sample(batch, logits)
        except Exception as e:  # a failed step fails its requests, never the server
            log.exception("engine step failed")
            for seq in batch:
                self._finish(seq, Output(), "error", error=f"{type(e).__name__}: {e}")
        self.steps += 1

    def _can_pack(self, decoding: list, admitted: list) -> bool:
        """Whether prompts and decode tokens go in one packed step: its query x key pairs stay under
        MAX_PACKED_SCORES (each query is masked against every sequence's keys), and a model with
        learned positions sees no more tokens in its row than it has positions."""
        queries = len(decoding) + sum(len(seq.tokens) for seq in admitted)
        keys = sum(len(seq.tokens) for seq in decoding + admitted)
        learned = self.model.config.position_embedding_type == "learned_absolute"
        return queries * keys <= MAX_PACKED_SCORES and not (learned and queries > self.model.config.max_positions)

    def _take_aborts(self) -> None:
        with self._cond:
            aborted, self._aborted = self._aborted, set()
            self.waiting = collections.deque(s for s in self.waiting if s.request.id not in aborted)
        for seq in [s for s in self.running if s.request.id in aborted]:
            self._finish(seq, Output(), "abort")

    def _admit(self, decoding: int) -> list:
        """Move waiting requests into the batch while sequences, step tokens (`decoding` taken by the
        running sequences) and blocks allow."""
        admitted, tokens = [], decoding
        with self._cond:
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.request.params.max_new_tokens == 0:
                    self.waiting.popleft()
                    self._finish(seq, Output(), "length")
                    continue
                n = len(seq.tokens)
                # Alone in its step, a preempted sequence (prompt plus what it generated) may go past the
                # budget; it fits the context, and would otherwise never run again.
                if tokens + n > self.max_num_batched_tokens and (admitted or decoding):
                    break
                try:
                    self.cache.reserve(seq.request.id, n)
                except CacheExhausted:
                    break
                self.waiting.popleft()
                self.running.append(seq)
                admitted.append(seq)
                tokens += n
        return admitted

    def _make_room(self) -> list:
        """Reserve the next token's slot of every running sequence, preempting the newest ones when the
        cache is full; the sequences left to decode."""
        for seq in list(self.running):
            while seq in self.running:
                try:
                    self.cache.reserve(seq.request.id, 1)
                    break
                except CacheExhausted:
                    self._preempt(self.running[-1])
        return list(self.running)

    def _preempt(self, seq: _Sequence) -> None:
        self.cache.release(seq.request.id)
        self.running.remove(seq)
        with self._cond:
            self.waiting.appendleft(seq)
        self.preemptions += 1

    def _forward(self, batch: list, packed: bool) -> torch.Tensor:
        """The new tokens of each sequence through the model: fp32 logits of each one's last position."""
        lengths = self.cache.lengths
        new = [seq.tokens[lengths[seq.request.id]:] for seq in batch]
        if packed:
            tokens = torch.tensor([[t for ids in new for t in ids]])
        else:
            tokens = torch.zeros(len(batch), max(len(t) for t in new), dtype=torch.long)
            for row, ids in enumerate(new):
                tokens[row, :len(ids)] = torch.tensor(ids)
        seq_ids = [seq.request.id for seq in batch]
        layout = self.cache.layout(seq_ids, [len(t) for t in new], packed)
        return self.runner.run(tokens.to(self.device), layout, seq_ids)

    def _sample(self, batch: list, logits: torch.Tensor) -> None:
        chosen = [0] * len(batch)
        greedy = [row for row, seq in enumerate(batch) if seq.request.params.greedy]
        if greedy:
            for row, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                chosen[row] = token
        for row, seq in enumerate(batch):
            params = seq.request.params
            if not params.greedy:
                chosen[row] = int(next_tokens(process_logits(logits[row:row + 1], params), params, seq.generator)[0])
            self._advance(seq, chosen[row], logits[row])

    def _advance(self, seq: _Sequence, token: int, logits: torch.Tensor) -> None:
        """Add the chosen token to a sequence and send what it makes visible."""
        params, request = seq.request.params, seq.request
        out = Output(token_ids=[token])
        if request.logprobs is not None:
            logprobs = logits.log_softmax(dim=-1)
            top = torch.topk(logprobs, request.logprobs) if request.logprobs else None
            out.logprobs.append((token, float(logprobs[token]),
                                 list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
        seq.counted += 1
        if token in params.stop_token_ids or token == self.eod:
            out.token_ids, out.logprobs = [], []
            return self._finish(seq, out, "stop")
        seq.tokens.append(token)
        seq.generated.append(token)
        text = self.decode(seq.generated)
        cut = _first_stop(text, params.stop_strings, seq.emitted)
        if cut is not None:
            out.text = text[seq.emitted:cut]
            return self._finish(seq, out, "stop")
        if seq.counted >= params.max_new_tokens or len(seq.tokens) >= self.model.config.max_positions:
            out.text = text[seq.emitted:]
            return self._finish(seq, out, "length")
        seq.unfinished_char = seq.unfinished_char + 1 if text.endswith("\ufffd") else 0
        # A character's bytes may still be coming (4 at most in UTF-8): wait for them, not longer.
        if seq.unfinished_char == 0 or seq.unfinished_char >= 4:
            safe = len(text) - _held_back(text, params.stop_strings)
            if safe > seq.emitted:
                out.text, seq.emitted = text[seq.emitted:safe], safe
        self._emit(seq, out)

    def _emit(self, seq: _Sequence, out: Output) -> None:
        out.prompt_tokens, out.completion_tokens = len(seq.request.prompt), seq.counted
        try:
            seq.request.emit(out)
        except Exception:  # a broken consumer is that request's problem only
            log.exception("delivering an output of request %s failed", seq.request.id)
            self.abort(seq.request.id)

    def _finish(self, seq: _Sequence, out: Output, reason: str, error: Optional[str] = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        out.finish_reason, out.error = reason, error
        self.cache.release(seq.request.id)
        if seq in self.running:
            self.running.remove(seq)
        self._emit(seq, out)


class ModelRunner:
    """Runs the model over one step: its tokens [b, s] and `StepLayout`; returns fp32 logits of each
    row's last new token, [b, vocab_size].

    Under tensor parallelism every rank holds its share of the heads (and of the cache) and all must
    run every step together: the scheduling rank (TP rank 0) sends each step's tokens and layout to
    the others before running it, and the others wait for steps in `follow`.
    """

    def __init__(self, model, cache: PagedKVCache, vocab_size: int, parallel=None):
        self.model, self.cache, self.vocab_size = model, cache, vocab_size
        self.group = parallel.tensor_model_parallel_group if parallel is not None else None
        self.tp = parallel.tensor_model_parallel_size if parallel is not None else 1
        self.device = cache.keys[0].device

    def run(self, tokens: torch.Tensor, layout: StepLayout, seq_ids: Optional[list] = None) -> torch.Tensor:
        """tokens: [b, s] right-padded, or [1, T] when the layout is packed."""
        if self.tp > 1 and seq_ids is not None:
            self._send(tokens, layout)
        with torch.inference_mode():
            paged = PagedBatch(self.cache, layout, seq_ids)
            h = self.model.hidden_states(tokens, paged)  # [rows, s, h]
            last = h[paged.last]  # each sequence's last new token
            logits = vocab_parallel_logits(last, self.model.output_weight)
            if self.tp > 1:
                logits = gather_from_tensor_parallel_region(logits, self.group)
        return logits[:, :self.vocab_size].float()

    def _send(self, tokens: torch.Tensor, layout: StepLayout) -> None:
        import torch.distributed as dist
        rows, s = tokens.shape
        b, width = layout.tables.shape
        header = torch.tensor([b, rows, s, width, int(layout.packed)], device=self.device)
        dist.broadcast(header, dist.get_global_rank(self.group, 0), group=self.group)
        body = torch.cat([tokens.flatten(), layout.cached, layout.new, layout.tables.flatten()])
        dist.broadcast(body, dist.get_global_rank(self.group, 0), group=self.group)

    def follow(self) -> None:
        """On a rank other than the scheduling one: run every step it sends, until it sends none."""
        import torch.distributed as dist
        src = dist.get_global_rank(self.group, 0)
        while True:
            header = torch.zeros(5, dtype=torch.long, device=self.device)
            dist.broadcast(header, src, group=self.group)
            b, rows, s, width, packed = header.tolist()
            if b == 0:
                return
            body = torch.zeros(rows * s + 2 * b + b * width, dtype=torch.long, device=self.device)
            dist.broadcast(body, src, group=self.group)
            tokens, cached, new, tables = body.split([rows * s, b, b, b * width])
            self.run(tokens.view(rows, s), StepLayout(cached, new, tables.view(b, width), bool(packed)))

    def release_followers(self) -> None:
        """Tell the other ranks that no step will come (the scheduling rank is stopping)."""
        import torch.distributed as dist
        if self.tp > 1 and dist.get_rank(self.group) == 0:
            dist.broadcast(torch.zeros(5, dtype=torch.long, device=self.device),
                           dist.get_global_rank(self.group, 0), group=self.group)
            self.tp = 1


def _first_stop(text: str, stops, emitted: int) -> Optional[int]:
    """Where the first stop string in `text` starts (only text not yet sent can hold a new one)."""
    starts = [text.find(s, max(0, emitted - len(s) + 1)) for s in stops if s]
    starts = [i for i in starts if i >= 0]
    return min(starts) if starts else None


def _held_back(text: str, stops) -> int:
    """How many trailing characters of `text` could still begin a stop string."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
