"""Supervised fine-tuning samples: jsonl formats, chat templates and loss masks.

Formats (one JSON object per line, Hugging Face TRL's dataset formats):

- conversational: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}],
  "tools": [...]}`` (``tools`` optional). Loss on every assistant message.
- prompt-completion: ``{"prompt": "...", "completion": "..."}``. Loss on the completion and the
  end-of-document token appended to it. Prompt and completion are tokenized separately and joined,
  as the model sees them at generation time (the prompt encoded, then the tokens it generates).
- conversational prompt-completion: ``{"prompt": [messages], "completion": [messages]}``. Loss on
  everything the template renders after the prompt (rendered with ``add_generation_prompt``).
- language modeling: ``{"text": "..."}``. Loss on every token, an end-of-document token appended.

Chat templates are Jinja, found as transformers 5 finds them in the tokenizer's directory: the
files ``chat_template.jinja`` (the "default" template) and ``additional_chat_templates/NAME.jinja``
win over ``tokenizer_config.json``'s ``"chat_template"``, which is a string or a list of
``{"name", "template"}``. A sample with ``tools`` uses the "tool_use" template where there is one,
else "default". ``--chat-template PATH`` replaces them all. A tokenizer without any (megalm's own
MegaBPE / GPT-2 tokenizers) gets `DEFAULT_CHAT_TEMPLATE`, ChatML. Templates render in Jinja's
immutable sandbox (they are code from the Hub) with transformers' extras: ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and the tokenizer's ``bos_token`` /
``eos_token`` / ``pad_token`` / ``unk_token`` strings.

Loss masks of conversations, two ways:

- A template with ``{% generation %}...{% endgeneration %}`` blocks: the conversation is rendered
  once and every token whose characters overlap a generation block is trained, exactly as
  transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``.
- Any other template, by rendering prefixes: for each assistant message, the conversation before it
  with ``add_generation_prompt=True`` and the conversation up to and including it; the tokens
  between the two are the assistant's (its content and the end-of-turn marker the template writes).
  This needs every rendered prefix to be a prefix of the whole rendered conversation. Templates
  that rewrite earlier turns once later ones exist (Qwen3's drops the ``<think>`` blocks of
  assistant turns before the last user message) break it; that is an error naming the template
  and the sample, never a silently shifted mask. The prefixes' token ids are compared too: where
  the tokenizer merges text across a turn boundary into one token (a message that starts with a
  newline, under a pre-tokenizer that joins newlines), that sample is masked by the rule of the
  first way instead (a token overlapping the assistant's characters is trained), and the samples
  so masked are counted in one warning per file.

A sample with no token to train on is an error naming it ("sample 17 of FILE has no assistant
token to train on"), as are bad JSON, an unknown format, empty messages and a role the template
rejects.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from collections import Counter
from datetime import datetime
from typing import Optional, Sequence

import numpy as np

from megalm.data.errors import DataError

DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n\nYou may call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "<tool_call>\n{{ (call['function'] if 'function' in call else call) | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_TEMPLATE_SOURCE = "megalm's default ChatML template"

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

# (rendered chunks so far, generation spans) while `ChatTemplate.render_spans` renders.
_GENERATION_TRACKER = contextvars.ContextVar("generation_tracker", default=None)


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise DataError("chat templates need the jinja2 package: pip install 'jinja2>=3.1'") from None
    return jinja2


def _environment():
    jinja2 = _jinja()

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body and, while a tracker is
        active, records the body's character span in the output."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

        def _record(self, caller):
            text = caller()
            tracker = _GENERATION_TRACKER.get()
            if tracker is not None:
                # Top-level output is streamed, so the chunks yielded so far are all that precedes.
                chunks, spans = tracker
                start = sum(len(c) for c in chunks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """One compiled Jinja chat template. `source` names it in messages (a file, or a config entry)."""

    def __init__(self, text: str, source: str, special_tokens: Optional[dict] = None):
        jinja2 = _jinja()
        self.text = text
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self.template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"the chat template {source} does not parse (line {e.lineno}: {e.message}); "
                            f"fix it or give another with --chat-template PATH") from None
        self.has_generation_blocks = GENERATION_TAG.search(text) is not None

    def render(self, messages: list, tools: Optional[list] = None, add_generation_prompt: bool = False,
               where: str = "") -> str:
        return self._render(messages, tools, add_generation_prompt, where, track=False)[0]

    def render_spans(self, messages: list, tools: Optional[list] = None, where: str = "") -> tuple[str, list]:
        """The rendered conversation and the (start, end) character spans of its generation blocks."""
        return self._render(messages, tools, False, where, track=True)

    def _render(self, messages, tools, add_generation_prompt, where, track):
        jinja2 = _jinja()
        chunks, spans = [], []
        token = _GENERATION_TRACKER.set((chunks, spans) if track else None)
        try:
            for chunk in self.template.generate(messages=messages, tools=tools, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **self.special_tokens):
                chunks.append(chunk)
        except Exception as e:  # a template is code: whatever it raises is its verdict on this sample
            kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
            raise DataError(f"{where}: the chat template {self.source} rejects it: {kind}{e}") from None
        finally:
            _GENERATION_TRACKER.reset(token)
        return "".join(chunks), spans


# ---- finding a tokenizer's templates ------------------------------------------------------------


def tokenizer_directory(data_config) -> Optional[str]:
    """The directory of `--tokenizer-model` (or of `--vocab-file`), where chat templates live."""
    path = data_config.tokenizer_model or data_config.vocab_file
    if not path:
        return None
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def load_chat_templates(tokenizer_dir: Optional[str], tokenizer=None,
                        chat_template_path: Optional[str] = None) -> dict:
    """{name: ChatTemplate} of a tokenizer directory (see the module docstring for the search order);
    only "default" when `chat_template_path` (--chat-template) is given or nothing is found."""
    config = _tokenizer_config(tokenizer_dir)
    special = _special_tokens(config, tokenizer)
    if chat_template_path:
        return {"default": ChatTemplate(_read_template(chat_template_path, "--chat-template"),
                                        chat_template_path, special)}
    texts = _template_files(tokenizer_dir) or _config_templates(config, tokenizer_dir)
    if not texts:
        return {"default": ChatTemplate(DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_SOURCE, special)}
    return {name: ChatTemplate(text, source, special) for name, (text, source) in texts.items()}


def select_template(templates: dict, tools) -> ChatTemplate:
    """transformers' choice: "tool_use" for a sample with tools where there is one, else "default"."""
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise DataError(f"the tokenizer has chat templates {sorted(templates)} but none named 'default'; "
                    f"give the one to use with --chat-template PATH")


def _read_template(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{what} {path}: cannot read the chat template ({e.strerror or e})") from None


def _tokenizer_config(tokenizer_dir: Optional[str]) -> dict:
    path = os.path.join(tokenizer_dir, "tokenizer_config.json") if tokenizer_dir else None
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); fix or remove it") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} should hold a JSON object, not {type(config).__name__}")
    return config


def _template_files(tokenizer_dir: Optional[str]) -> dict:
    if not tokenizer_dir:
        return {}
    found = {}
    main = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(main):
        found["default"] = (_read_template(main, "chat template"), main)
    extra = os.path.join(tokenizer_dir, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                path = os.path.join(extra, name)
                found[name[: -len(".jinja")]] = (_read_template(path, "chat template"), path)
    return found


def _config_templates(config: dict, tokenizer_dir: Optional[str]) -> dict:
    value = config.get("chat_template")
    where = os.path.join(tokenizer_dir or "", "tokenizer_config.json")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": (value, f"{where} chat_template")}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: (t["template"], f"{where} chat_template {t['name']!r}") for t in value}
    raise DataError(f"{where}: \"chat_template\" should be a string or a list of {{\"name\", \"template\"}} "
                    f"objects")


def _special_tokens(config: dict, tokenizer) -> dict:
    """bos/eos/pad/unk token strings for the template: tokenizer_config.json's, else the tokenizer's
    end-of-document token as eos_token."""
    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    if "eos_token" not in special and tokenizer is not None and tokenizer.eod is not None:
        special["eos_token"] = tokenizer.decode([tokenizer.eod])
    return special


# ---- samples -> token ids and loss masks ---------------------------------------------------------


def encode_sample(record, tokenizer, templates: dict, where: str,
                  notes: Optional[Counter] = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 [n], loss mask uint8 [n]) of one jsonl record; mask 1 = trained on.

    `where` names the sample in errors ("sample 17 of FILE (line 18)"); `notes` counts samples
    masked by the fallback rule of `_mask_by_prefixes`."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with \"messages\", "
                        f"\"prompt\" and \"completion\", or \"text\"")
    if "messages" in record:
        messages = _check_messages(record["messages"], where, "messages")
        tools = _check_tools(record.get("tools"), where)
        ids, mask = _encode_conversation(messages, tools, tokenizer, select_template(templates, tools), where,
                                         notes)
    elif "prompt" in record and "completion" in record:
        ids, mask = _encode_prompt_completion(record, tokenizer, templates, where, notes)
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: \"text\" should be a string, not {type(record['text']).__name__}")
        ids = _with_eod(tokenizer.encode(record["text"]), tokenizer)
        mask = [1] * len(ids)
    else:
        raise DataError(f"{where} has an unknown format (keys {sorted(record)}): give \"messages\", "
                        f"\"prompt\" and \"completion\", or \"text\"")
    ids, mask = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)
    # Position 0 is never a label (nothing precedes it), so a sample needs a trained token after it.
    if not mask[1:].any():
        kind = "completion" if "prompt" in record and "messages" not in record else "assistant"
        raise DataError(f"{where} has no {kind} token to train on; give it an assistant message with content "
                        f"(or a non-empty completion), or remove it")
    return ids, mask


def _with_eod(ids: list, tokenizer) -> list:
    return list(ids) + ([tokenizer.eod] if tokenizer.eod is not None else [])


def _check_messages(messages, where: str, field: str) -> list:
    if not isinstance(messages, list):
        raise DataError(f"{where}: \"{field}\" should be a list of {{\"role\", \"content\"}} objects, "
                        f"not {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: \"{field}\" is empty; give at least one message")
    checked = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: {field}[{k}] should be an object with a string \"role\" "
                            f"(and \"content\"), got {json.dumps(message)[:80]}")
        # As transformers does: a key set to null is a key left out (templates test for presence).
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


def _check_tools(tools, where: str) -> Optional[list]:
    if tools is None or (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return tools or None
    raise DataError(f"{where}: \"tools\" should be a list of JSON schema objects")


def _encode_prompt_completion(record: dict, tokenizer, templates: dict, where: str, notes: Optional[Counter]):
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = tokenizer.encode(prompt)
        completion_ids = _with_eod(tokenizer.encode(completion), tokenizer)
        return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = _check_messages(prompt, where, "prompt")
        completion = _check_messages(completion, where, "completion")
        tools = _check_tools(record.get("tools"), where)
        template = select_template(templates, tools)
        return _mask_by_prefixes(prompt + completion, tools, tokenizer, template, where,
                                 [(len(prompt), len(prompt) + len(completion))], notes)
    raise DataError(f"{where}: \"prompt\" and \"completion\" should both be strings or both be lists of "
                    f"messages, got {type(prompt).__name__} and {type(completion).__name__}")


def _encode_conversation(messages: list, tools, tokenizer, template: ChatTemplate, where: str,
                         notes: Optional[Counter]):
    if template.has_generation_blocks:
        text, spans = template.render_spans(messages, tools, where)
        ids, offsets = token_offsets(tokenizer, text)
        return ids, _overlap_mask(offsets, spans)
    turns = [(k, k + 1) for k, m in enumerate(messages) if m["role"] == "assistant"]
    return _mask_by_prefixes(messages, tools, tokenizer, template, where, turns, notes)


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list:
    """1 for every token whose characters overlap a span (transformers' rule, so a token that straddles
    a block's edge is trained). Both lists are in order, so one pass suffices."""
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0] and end > start:
            mask[t] = 1
    return mask


def _mask_by_prefixes(messages: list, tools, tokenizer, template: ChatTemplate, where: str,
                      trained: Sequence[tuple[int, int]], notes: Optional[Counter] = None):
    """Token ids of the whole conversation, and a mask of 1 on the tokens that messages[i:j] add for
    each (i, j) in `trained`: those between the rendering of messages[:i] with the generation prompt
    and the rendering of messages[:j].

    Each rendered prefix must start the whole rendering (else the template rewrites earlier turns:
    an error). Its tokens are then nearly always the first tokens of the whole; where the tokenizer
    merges text across a turn boundary (a message that starts with a newline after the template's
    own), the mask follows transformers' rule for generation blocks instead: a token overlapping
    the assistant's characters is trained. `notes["merged_across_turns"]` counts those samples."""
    full = template.render(messages, tools, where=where)
    prefixes = {}

    def end_of(count: int, generation_prompt: bool) -> int:
        if (count, generation_prompt) not in prefixes:
            text = template.render(messages[:count], tools, generation_prompt, where)
            _check_prefix(text, full, template, where, count, generation_prompt)
            prefixes[count, generation_prompt] = text
        return len(prefixes[count, generation_prompt])

    spans = [(end_of(i, True), len(full) if j == len(messages) else end_of(j, False)) for i, j in trained]
    ids = tokenizer.encode(full)
    token_ends = {len(full): len(ids)}  # character offset of a boundary -> tokens before it
    for text in set(prefixes.values()):
        prefix_ids = list(tokenizer.encode(text))
        if ids[: len(prefix_ids)] != prefix_ids:
            if notes is not None:
                notes["merged_across_turns"] += 1
            ids, offsets = token_offsets(tokenizer, full)
            return ids, _overlap_mask(offsets, spans)
        token_ends[len(text)] = len(prefix_ids)
    mask = [0] * len(ids)
    for start, end in spans:
        mask[token_ends[start]: token_ends[end]] = [1] * (token_ends[end] - token_ends[start])
    return ids, mask


def _check_prefix(prefix: str, full: str, template: ChatTemplate, where: str, count: int,
                  generation_prompt: bool) -> None:
    if full.startswith(prefix):
        return
    what = (f"the first {count} message{'s' if count != 1 else ''}"
            f"{' with add_generation_prompt' if generation_prompt else ''}")
    at = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    raise DataError(
        f"{where}: the chat template {template.source} renders {what} as text that is not the start of the "
        f"whole conversation (they part at character {at}: {prefix[at:at + 40]!r} vs {full[at:at + 40]!r}), "
        f"so the assistant tokens cannot be found by rendering prefixes. Templates that rewrite earlier turns "
        f"(like Qwen3's, which drops the <think> blocks of earlier assistant turns) need "
        f"{{% generation %}}...{{% endgeneration %}} around the assistant output, or give a template that "
        f"renders every turn the same whatever follows it with --chat-template PATH")


def token_offsets(tokenizer, text: str) -> tuple[list, list]:
    """(ids, [(start, end) character span of each token]) of `text`.

    The `tokenizers` library reports the spans itself; for byte-level tokenizers they come from each
    token's bytes (a token ending inside a multi-byte character covers that character); for any
    other tokenizer from the lengths of the decoded prefixes."""
    library = getattr(tokenizer, "tokenizer", None)
    if library is not None and hasattr(library, "encode"):
        encoding = library.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    ids = tokenizer.encode(text)
    if hasattr(tokenizer, "decode_bytes"):
        byte_bounds = np.cumsum([0] + [len(tokenizer.decode_bytes([i])) for i in ids], dtype=np.int64)
        char_starts = np.cumsum([0] + [len(c.encode("utf-8")) for c in text], dtype=np.int64)[:-1]
        # From the character holding a token's first byte to the end of the one holding its last.
        starts = np.searchsorted(char_starts, byte_bounds[:-1], side="right") - 1
        ends = np.searchsorted(char_starts, byte_bounds[1:], side="left")
    else:
        bounds = [0] + [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
        starts, ends = bounds[:-1], bounds[1:]
    return ids, [(int(a), int(b)) for a, b in zip(starts, ends)]
