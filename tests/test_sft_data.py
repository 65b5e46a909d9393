"""Supervised fine-tuning data: jsonl formats, chat templates, loss masks, the tokenized cache,
truncation, packing and tools/preprocess_sft.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megalm.config import DataConfig, PostTrainConfig
from megalm.data.chat import DEFAULT_TEMPLATE_SOURCE, ChatTemplate, encode_sample, load_chat_templates, select_template
from megalm.data.errors import DataError
from megalm.data.sft_dataset import (
    IGNORE_INDEX,
    ITEM_KEYS,
    SFTDataset,
    TokenizedSamples,
    build_sft_datasets,
    collate_sft,
    pack_best_fit_decreasing,
    tokenized_file,
)
from megalm.data.tokenizer.huggingface import HuggingFaceTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("The user asks a question and the assistant answers it. What is the capital of France? "
          "Paris is the capital of France. How many legs does a spider have? A spider has eight legs. "
          "Tell me a joke about numbers: seven ate nine. You may call tools to get the weather.\n") * 20

CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Like Qwen3's: the reasoning of assistant turns before the last user message is dropped.
DROPS_EARLIER_THINKING = (
    "{% set ns = namespace(last_user=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and loop.index0 < ns.last_user %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "How many legs does a spider have?"},
    {"role": "assistant", "content": "Eight legs."},
]


def write_tokenizer(directory, chat_template=None):
    """A small byte-level BPE tokenizer.json with the ChatML special tokens, trained on CORPUS, and the
    tokenizer_config.json transformers reads (with `chat_template` when given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return HuggingFaceTokenizer(os.path.join(tok_dir, "tokenizer.json"))


def trained_text(tokenizer, ids, mask):
    """The trained tokens, decoded run by run."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(int(i))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def encode(tokenizer, record, templates=None, where="sample 1 of data.jsonl (line 1)"):
    return encode_sample(record, tokenizer, templates or load_chat_templates(None, tokenizer), where)


# ---- formats -----------------------------------------------------------------------------------------


def test_messages_train_only_on_assistant_turns(tokenizer):
    ids, mask = encode(tokenizer, {"messages": CONVERSATION})
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou answer briefly.<|im_end|>\n")
    assert trained_text(tokenizer, ids, mask) == ["Paris.<|im_end|>\n", "Eight legs.<|im_end|>\n"]


def test_prompt_completion_strings_train_on_completion_and_eod(tokenizer):
    ids, mask = encode(tokenizer, {"prompt": "What is the capital of France?", "completion": " Paris."})
    assert trained_text(tokenizer, ids, mask) == [" Paris.<|endoftext|>"]
    assert tokenizer.decode(ids) == "What is the capital of France? Paris.<|endoftext|>"


def test_conversational_prompt_completion_trains_after_the_generation_prompt(tokenizer):
    ids, mask = encode(tokenizer, {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]})
    assert trained_text(tokenizer, ids, mask) == ["Eight legs.<|im_end|>\n"]


def test_text_trains_on_every_token(tokenizer):
    ids, mask = encode(tokenizer, {"text": "A spider has eight legs."})
    assert tokenizer.decode(ids) == "A spider has eight legs.<|endoftext|>"
    assert mask.all()


def test_tools_choose_the_tool_use_template(tmp_path, tokenizer):
    directory = write_tokenizer(tmp_path / "tok", chat_template=[
        {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"},
        {"name": "tool_use", "template": "TOOLS {{ tools | tojson }}{% for m in messages %}({{ m['content'] }})"
                                         "{% endfor %}"}])
    templates = load_chat_templates(directory, tokenizer)
    plain = encode(tokenizer, {"messages": CONVERSATION[1:3]}, templates)[0]
    tools = [{"type": "function", "function": {"name": "weather"}}]
    with_tools = encode(tokenizer, {"messages": CONVERSATION[1:3], "tools": tools}, templates)[0]
    assert tokenizer.decode(plain) == "[What is the capital of France?][Paris.]"
    assert tokenizer.decode(with_tools).startswith('TOOLS [{"type": "function"')


def test_template_files_win_over_config_and_the_flag_wins_over_both(tmp_path, tokenizer):
    directory = write_tokenizer(tmp_path / "tok", chat_template="config {{ messages[0]['content'] }}")
    assert select_template(load_chat_templates(directory, tokenizer), None).text.startswith("config")
    (tmp_path / "tok" / "chat_template.jinja").write_text("file {{ messages[0]['content'] }}")
    os.makedirs(tmp_path / "tok" / "additional_chat_templates")
    (tmp_path / "tok" / "additional_chat_templates" / "tool_use.jinja").write_text("tools")
    templates = load_chat_templates(directory, tokenizer)
    assert sorted(templates) == ["default", "tool_use"] and templates["default"].text.startswith("file")
    override = tmp_path / "mine.jinja"
    override.write_text("mine")
    assert load_chat_templates(directory, tokenizer, str(override))["default"].source == str(override)
    assert load_chat_templates(None, tokenizer)["default"].source == DEFAULT_TEMPLATE_SOURCE


def test_templates_see_special_tokens_and_transformers_helpers(tokenizer):
    template = ChatTemplate("{{ eos_token }}|{{ strftime_now('%Y') | length }}|{{ {'é': 1} | tojson }}", "t",
                            {"eos_token": "<|endoftext|>"})
    assert template.render([{"role": "user", "content": ""}]) == '<|endoftext|>|4|{"é": 1}'


def test_template_is_sandboxed(tokenizer):
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", "evil.jinja")
    with pytest.raises(DataError, match="evil.jinja rejects it"):
        template.render([], where="sample 1 of x.jsonl")


# ---- masks: {% generation %} equals transformers ---------------------------------------------------


def test_generation_masks_equal_transformers(tmp_path):
    from transformers import AutoTokenizer

    directory = write_tokenizer(tmp_path / "tok", chat_template=CHATML_WITH_GENERATION)
    ours = HuggingFaceTokenizer(os.path.join(directory, "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(directory)
    templates = load_chat_templates(directory, ours)
    assert templates["default"].has_generation_blocks
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2] + [
        {"role": "assistant", "content": "Paris, the capital: ünïcode ✓ and \n newlines\n"}]]
    for messages in conversations:
        ids, mask = encode(ours, {"messages": messages}, templates)
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        assert ids.tolist() == expected["input_ids"]
        assert mask.tolist() == expected["assistant_masks"]
    assert trained_text(ours, ids, mask) == ["Paris, the capital: ünïcode ✓ and \n newlines\n<|im_end|>"]


def test_megabpe_byte_offsets_give_the_same_masks_as_the_tokenizers_library(tmp_path):
    """megalm's own tokenizer has no offsets of its own: they come from each token's bytes, and a
    multi-byte character split across tokens belongs to both."""
    from megalm.data.tokenizer.bpe_train import train_bpe

    megabpe = train_bpe([CORPUS + "ünïcode ✓ 東京 " * 5], vocab_size=330, special_tokens=SPECIALS, min_frequency=1)
    megabpe.save(str(tmp_path / "tokenizer.json"))
    library = HuggingFaceTokenizer(str(tmp_path / "tokenizer.json"))
    templates = {"default": ChatTemplate(CHATML_WITH_GENERATION, "chatml-generation.jinja")}
    messages = CONVERSATION[:2] + [{"role": "assistant", "content": "東京 and ünïcode ✓ 🙂"}]
    ids, mask = encode(megabpe, {"messages": messages}, templates)
    expected_ids, expected_mask = encode(library, {"messages": messages}, templates)
    assert ids.tolist() == expected_ids.tolist() and mask.tolist() == expected_mask.tolist()
    assert trained_text(megabpe, ids, mask) == ["東京 and ünïcode ✓ 🙂<|im_end|>"]
    default_ids, default_mask = encode(megabpe, {"messages": CONVERSATION})  # the ChatML default, by prefixes
    assert trained_text(megabpe, default_ids, default_mask) == ["Paris.<|im_end|>\n", "Eight legs.<|im_end|>\n"]


def test_tokens_merged_across_a_turn_boundary_are_masked_by_overlap_and_counted(tmp_path, caplog):
    """GPT-4's pre-tokenizer joins newlines, so the template's newline after "assistant" and a message's
    leading one become one token: the assistant's characters overlap it, so it is trained."""
    from megalm.data.tokenizer.bpe_train import train_bpe

    megabpe = train_bpe([CORPUS + "answer:\n\nyes\n\n" * 20], vocab_size=330, special_tokens=SPECIALS,
                        min_frequency=1)
    assert len(megabpe.encode("\n\n")) == 1
    megabpe.save(str(tmp_path / "tokenizer.json"))
    messages = CONVERSATION[1:2] + [{"role": "assistant", "content": "\nParis."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": messages}])
    samples = tokenized_file(path, megabpe, load_chat_templates(None, megabpe), progress=False)
    assert "in 1 of 2 samples the tokenizer merges text across a turn boundary" in caplog.text
    ids, mask = samples.get(1)
    assert trained_text(megabpe, ids, mask) == ["\n\nParis.<|im_end|>\n"]
    assert megabpe.decode(ids) == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" \
                                  "<|im_start|>assistant\n\nParis.<|im_end|>\n"


def test_prefix_breaking_template_is_reported(tmp_path, tokenizer):
    template = tmp_path / "qwen3_like.jinja"
    template.write_text(DROPS_EARLIER_THINKING)
    templates = load_chat_templates(None, tokenizer, str(template))
    thinking = [{"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "<think>It is Paris.</think>Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "<think>Rome.</think>Rome."}]
    path = write_jsonl(tmp_path / "think.jsonl", [{"messages": CONVERSATION}, {"messages": thinking}])
    with pytest.raises(DataError) as e:
        tokenized_file(path, tokenizer, templates, progress=False)
    message = str(e.value)
    assert f"sample 2 of {path} (line 2)" in message and str(template) in message
    assert "not the start of the whole conversation" in message and "{% generation %}" in message


# ---- errors name the file, the line and the fault ----------------------------------------------------


@pytest.mark.parametrize("line, fault", [
    ("{not json", "line 2\\) is not valid JSON"),
    ('{"question": "x"}', r"line 2\) has an unknown format \(keys \['question'\]\)"),
    ('{"messages": []}', r'"messages" is empty'),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "megalm's default ChatML template rejects it: unknown role robot"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "sample 2 of .* has no assistant token to train on"),
    ('{"prompt": "hi", "completion": ["x"]}', '"prompt" and "completion" should both be strings'),
])
def test_bad_samples_are_errors_naming_file_and_line(tmp_path, tokenizer, line, fault):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError, match=fault) as e:
        tokenized_file(path, tokenizer, load_chat_templates(None, tokenizer), progress=False)
    assert str(path) in str(e.value)


def test_text_the_tokenizer_cannot_encode_names_the_sample(tmp_path):
    from megalm.data.tokenizer.null import NullTokenizer

    path = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "1 two 3"}])
    with pytest.raises(DataError, match=r"sample 2 of .*ids.jsonl \(line 2\): the NullTokenizer tokenizer cannot "
                                        r"encode it: NullTokenizer reads space-separated integer ids"):
        tokenized_file(path, NullTokenizer(10), {}, progress=False)


def test_empty_completion_without_eod_is_an_error(tokenizer):
    class NoEod:
        eod = None
        encode = tokenizer.encode
        decode = tokenizer.decode

    with pytest.raises(DataError, match="sample 17 of FILE has no completion token to train on"):
        encode(NoEod(), {"prompt": "hi", "completion": ""}, where="sample 17 of FILE")


# ---- datasets: rows, truncation, packing, cache --------------------------------------------------------


def samples_of(lengths, trained_from=1):
    """TokenizedSamples whose sample k holds ids 1000 k + position, trained from position `trained_from`."""
    tokens = np.concatenate([1000 * k + np.arange(n) for k, n in enumerate(lengths)]).astype(np.int32)
    mask = np.concatenate([(np.arange(n) >= trained_from) for n in lengths]).astype(np.uint8)
    return TokenizedSamples(tokens, mask, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), "mem")


def check_row(row, samples, seq_length, pad_id, train_on_prompt=False):
    """A row's four tensors agree, and each sample in it appears whole and shifted. Returns its samples."""
    assert all(row[k].shape == (seq_length,) and row[k].dtype == torch.int64 for k in ITEM_KEYS)
    documents = row["document_ids"].numpy()
    assert (np.diff(documents) >= 0).all() and documents[0] == 0
    found = []
    for d in np.unique(documents):
        at = np.flatnonzero(documents == d)
        assert (np.diff(at) == 1).all()
        assert row["position_ids"].numpy()[at].tolist() == list(range(len(at)))
        tokens, labels = row["tokens"].numpy()[at], row["labels"].numpy()[at]
        if d == documents[-1] and (tokens == pad_id).all() and (labels == IGNORE_INDEX).all():
            continue  # the padding
        k = int(tokens[0]) // 1000
        ids, mask = samples.get(k)
        n = min(len(ids) - 1, seq_length)
        assert len(at) == n and tokens.tolist() == ids[:n].tolist()
        expected = np.where(mask[1:n + 1].astype(bool) | train_on_prompt, ids[1:n + 1], IGNORE_INDEX)
        assert labels.tolist() == expected.tolist()
        found.append(k)
    return found


def test_unpacked_rows_hold_one_right_padded_sample(tokenizer):
    samples = samples_of([5, 10, 3])
    dataset = SFTDataset(samples, np.arange(3), seq_length=8, pad_id=7, seed=0)
    rows = [dataset[i] for i in range(len(dataset))]
    assert sorted(k for row in rows for k in check_row(row, samples, 8, 7)) == [0, 1, 2]
    short = next(r for r in rows if r["tokens"][0] == 2000)
    assert short["tokens"].tolist() == [2000, 2001] + [7] * 6
    assert short["document_ids"].tolist() == [0, 0] + [1] * 6
    assert short["position_ids"].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    assert dataset.stats["truncated"] == 1


def test_packing_keeps_every_sample_whole_and_consistent():
    rng = np.random.RandomState(0)
    lengths = rng.randint(2, 40, size=200)
    samples = samples_of(lengths, trained_from=3)
    dataset = SFTDataset(samples, np.arange(200), seq_length=32, pad_id=-1, seed=1, packing=True)
    seen = [k for i in range(len(dataset)) for k in check_row(dataset[i], samples, 32, -1)]
    assert sorted(seen) == list(range(200))
    assert len(dataset) < 200 and dataset.stats["packing_efficiency"] > 0.9
    batch = collate_sft([dataset[0], dataset[1]])
    assert sorted(batch) == sorted(ITEM_KEYS) and batch["tokens"].shape == (2, 32)


def test_best_fit_decreasing_is_deterministic_and_fills_rows():
    rows = pack_best_fit_decreasing([6, 2, 5, 3, 4, 1, 7], capacity=8)
    assert rows == [[6, 5], [0, 1], [2, 3], [4]]
    assert pack_best_fit_decreasing([6, 2, 5, 3, 4, 1, 7], capacity=8) == rows


def test_train_on_prompt_labels_every_next_token():
    samples = samples_of([6])
    row = SFTDataset(samples, [0], seq_length=8, pad_id=0, seed=0, train_on_prompt=True)[0]
    assert row["labels"].tolist()[:5] == [1, 2, 3, 4, 5]


def test_truncation_keeps_trained_samples_and_drops_the_rest():
    samples = samples_of([30, 30, 4], trained_from=12)
    samples.loss_mask[:30] = (np.arange(30) >= 5).astype(np.uint8)  # sample 0 trains early enough
    dataset = SFTDataset(samples, np.arange(3), seq_length=8, pad_id=0, seed=0)
    assert dataset.stats["truncated"] == 1 and dataset.stats["dropped"] == 1
    kept = sorted(k for i in range(len(dataset)) for k in check_row(dataset[i], samples, 8, 0))
    assert kept == [0, 2]


def test_more_samples_than_rows_repeat_in_a_fresh_order():
    dataset = SFTDataset(samples_of([4] * 5), np.arange(5), seq_length=4, pad_id=0, seed=3, num_samples=12)
    assert len(dataset) == 12
    first, second = dataset.order[:5], dataset.order[5:10]
    assert sorted(first) == sorted(second) == list(range(5)) and list(first) != list(second)


def sft_configs(paths, tok_dir, **posttrain):
    data = DataConfig(data_path=list(paths), split="8,2,0", tokenizer_type="HuggingFaceTokenizer",
                      tokenizer_model=tok_dir)
    return data, PostTrainConfig(**posttrain)


def test_datasets_split_and_reuse_the_cache(tmp_path, tok_dir, monkeypatch):
    import megalm.data.sft_dataset as sft

    records = [{"messages": CONVERSATION}, {"prompt": "Capital of France?", "completion": " Paris."},
               {"text": "A spider has eight legs."}] * 10
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    train, valid, test = build_sft_datasets(*sft_configs([path], tok_dir, packing=True), seq_length=64,
                                            seed=0, progress=False)
    assert test is None and train.stats["samples"] == 24 and valid.stats["samples"] == 6
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert len(cached) == 4 and cached[0].startswith("chat.jsonl-sft-")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds the samples")

    monkeypatch.setattr(sft, "tokenize_file", no_tokenizing)
    again = build_sft_datasets(*sft_configs([path], tok_dir, packing=True), seq_length=64, seed=0)[0]
    assert all(torch.equal(again[i][k], train[i][k]) for i in range(len(train)) for k in ITEM_KEYS)
    write_jsonl(path, records + [{"text": "One more."}])  # new contents: a new cache
    with pytest.raises(AssertionError, match="tokenized again"):
        build_sft_datasets(*sft_configs([path], tok_dir), seq_length=64, seed=0)


@pytest.mark.parametrize("damage, warning", [("-tokens.npy", "unreadable"), ("-description.json", "do not fit")])
def test_a_damaged_cache_is_rebuilt(tmp_path, tok_dir, tokenizer, caplog, damage, warning):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    templates = load_chat_templates(tok_dir, tokenizer)
    first = tokenized_file(path, tokenizer, templates, progress=False)
    damaged = next(p for p in (tmp_path / "cache").iterdir() if p.name.endswith(damage))
    damaged.write_text("garbage" if damage.endswith(".npy") else json.dumps({"samples": 2}))
    again = tokenized_file(path, tokenizer, templates, progress=False)
    assert warning in caplog.text
    assert np.array_equal(first.tokens, again.tokens) and np.array_equal(first.offsets, again.offsets)


def _tokenize_on_rank(rank, world_size, store, tok_dir, paths, out_dir):
    import megalm.data.sft_dataset as sft

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        tokenizer = HuggingFaceTokenizer(os.path.join(tok_dir, "tokenizer.json"))
        if rank:  # the other ranks must find rank 0's cache instead of tokenizing
            sft.tokenize_file = None
        outcomes = []
        for path in paths:
            try:
                result = sft.tokenized_file(path, tokenizer, load_chat_templates(tok_dir, tokenizer), progress=False)
                outcomes.append({"tokens": int(result.tokens.sum()), "samples": len(result)})
            except DataError as e:
                outcomes.append({"error": str(e)})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(outcomes, f)
    finally:
        torch.distributed.destroy_process_group()


def test_rank_zero_tokenizes_and_the_other_ranks_reuse_its_cache_or_its_error(tmp_path, tok_dir):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION}] * 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}] * 3 + [{"messages": CONVERSATION[:2]}])
    torch.multiprocessing.spawn(_tokenize_on_rank, nprocs=2,
                                args=(2, str(tmp_path / "store"), tok_dir, [good, bad], str(tmp_path)))
    outcomes = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0]["samples"] == 3
    assert outcomes[0][1]["error"].startswith(f"sample 4 of {bad} (line 4) has no assistant token")


# ---- tools/preprocess_sft.py ---------------------------------------------------------------------------


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_sft.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_preprocess_sft_prints_stats(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 9 + [{"text": "x " * 200}])
    result = run_tool("--data-path", path, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                      tok_dir, "--seq-length", "256", "--packing", "--split", "9,1,0", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "train: 9 samples in 3 rows of 256, 639 tokens, 16.9% trained on, 0 truncated" in result.stdout
    assert "valid: 1 samples in 1 rows of 256, 256 tokens, 100.0% trained on, 1 truncated" in result.stdout
    assert "trained on" in result.stdout and "packing efficiency" in result.stdout
    assert "test: no samples" in result.stdout


def test_preprocess_sft_reports_a_bad_sample(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    result = run_tool("--data-path", path, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                      tok_dir, "--seq-length", "64", "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: sample 2 of {path} (line 2) has no assistant token to train on; "
                                     f"give it an assistant message with content (or a non-empty completion), "
                                     f"or remove it")
