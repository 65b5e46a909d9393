"""Hugging Face <-> megalm checkpoints: the loader/saver pair behind tools/convert_checkpoint.py.

Import (`hf_to_megalm`): config.json picks the architecture; the directory's tensor names and shapes
are checked against those the config implies (before any data is read), the tensors are converted
by the architecture's table, the tokenizer files are copied into the checkpoint's tokenizer/ with
the config set to `--tokenizer-type HuggingFaceTokenizer` (or SentencePiece / GPT-2 BPE files when
there is no tokenizer.json), and the vocabulary is padded to `--make-vocab-size-divisible-by`.
config.json's `vocab_size` is the true vocabulary; it is recorded in metadata.json under "hf"
together with the token ids and generation_config.json, so that export restores them.

Export (`megalm_to_hf`): the checkpoint's tensors are checked against its config, converted, the
vocabulary trimmed back to the true size, and written as safetensors shards with config.json,
generation_config.json and the tokenizer files: a directory `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load without any megalm code.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from megalm.checkpoint import (
    checkpoint_config,
    checkpoint_dir,
    checkpoint_tokenizer,
    meta_model,
    open_checkpoint,
    partition_specs,
    read_metadata,
    save_weights,
)
from megalm.config import Config, ModelConfig, pad_vocab_size
from megalm.convert import hf_files
from megalm.convert.frame import Architecture, Context, ConversionError, check_tensors, hf_to_megalm_tensors, megalm_to_hf_tensors
from megalm.convert.gpt2 import GPT2
from megalm.convert.llama import Llama, Mistral, Qwen2

ARCHITECTURES = {arch.model_type: arch for arch in (Llama(), Mistral(), Qwen2(), GPT2())}
# config.json keys kept across a round trip that do not change the weights.
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def supported() -> str:
    return ", ".join(f"{a.hf_class} ({t})" for t, a in ARCHITECTURES.items())


def architecture_for_hf(hf: dict) -> Architecture:
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    name = (hf.get("architectures") or [model_type])[0]
    raise ConversionError(f"unsupported architecture {name} (model_type {model_type!r}); supported: {supported()}")


def architecture_for_megalm(config: ModelConfig, name: Optional[str] = None) -> Architecture:
    """The family named (or recorded at import), else the first one that can hold this model."""
    if name is not None:
        if name not in ARCHITECTURES:
            raise ConversionError(f"unsupported architecture {name!r}; supported: {supported()}")
        if not ARCHITECTURES[name].matches(config):
            raise ConversionError(f"this megalm model cannot be written as {ARCHITECTURES[name].hf_class}")
        return ARCHITECTURES[name]
    for arch in ARCHITECTURES.values():
        if arch.matches(config):
            return arch
    if config.num_experts:
        from megalm.convert.moe_mappings import routing_without_family
        reasons = routing_without_family(config)
        raise ConversionError(
            "no Hugging Face MoE family (Mixtral, Qwen2-MoE, DeepSeek-MoE) holds this megalm model"
            + (f": none routes with {', '.join(reasons)}" if reasons else
               " (see docs/MOE.md, Conversion, for what each family can hold: shared experts and their gate, "
               "dense layers, top-k normalisation)") + f"; supported: {supported()}")
    raise ConversionError(
        f"no Hugging Face architecture holds this megalm model (position embedding "
        f"{config.position_embedding_type}, {config.normalization}, swiglu={config.swiglu}, "
        f"bias={config.add_bias_linear}, qkv bias={config.add_qkv_bias}); supported: {supported()}")


def _stage_tokenizer(src: str, staging: str) -> Optional[str]:
    """Copy the tokenizer files of a HF directory into `staging`; the megalm tokenizer type they make."""
    names = hf_files.copy_tokenizer_files(src, staging)
    if "tokenizer.json" in names:
        return "HuggingFaceTokenizer"
    if "tokenizer.model" in names:
        return "SentencePieceTokenizer"
    if "vocab.json" in names and "merges.txt" in names:
        return "GPT2BPETokenizer"
    return None


def _check_tokenizer_size(tokenizer, rows: int, what: str) -> None:
    if tokenizer is not None and tokenizer.vocab_size > rows:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                              f"{rows} rows ({what}): they belong to different models")


def hf_to_megalm(src: str, dst: str, force: bool = False, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 layers_per_virtual_stage: Optional[int] = None, expert_parallel: int = 1, log=print) -> str:
    """Convert the Hugging Face directory `src` into a megalm checkpoint under `dst`, sharded for
    the given tensor / pipeline / expert-parallel layout; returns the iteration directory written."""
    if os.path.exists(dst) and not force:
        raise ConversionError(f"output directory {dst} exists; choose another or pass --force to overwrite it")
    if (tensor_parallel, pipeline_parallel, layers_per_virtual_stage, expert_parallel) != (1, 1, None, 1):
        from megalm.convert.reshard import reshard
        with tempfile.TemporaryDirectory() as staging:
            single = hf_to_megalm(src, os.path.join(staging, "tp1_pp1"), log=log)
            return reshard(single, dst, tensor_parallel, pipeline_parallel, layers_per_virtual_stage,
                           expert_parallel, force=force, log=log)
    hf = hf_files.read_json(os.path.join(src, "config.json"))
    arch = architecture_for_hf(hf)
    model_config = ModelConfig(**arch.model_config(hf))
    vocab_size = hf["vocab_size"]
    model_config.vocab_size = vocab_size
    model_config.padded_vocab_size = pad_vocab_size(vocab_size, model_config.make_vocab_size_divisible_by)
    ctx = Context(model_config, vocab_size)

    expected = megalm_to_hf_tensors(arch, ctx, meta_model(model_config).state_dict())
    found = arch.unfuse_hf({arch.normalize_hf_name(n): s for n, s in hf_files.tensor_shapes(src).items()})
    check_tensors(found, {n: t.shape for n, t in expected.items()}, src, arch.is_ignored)

    config = Config(model=model_config)
    with tempfile.TemporaryDirectory() as staging:
        tokenizer_type = _stage_tokenizer(src, staging)
        if tokenizer_type is not None:
            config.data.tokenizer_type, config.data.tokenizer_model = tokenizer_type, staging
            _check_tokenizer_size(checkpoint_tokenizer(config), vocab_size, f"vocab_size in {src}/config.json")
        else:
            log(f"warning: no tokenizer files in {src}; the checkpoint will have no tokenizer")
        hf_state = arch.unfuse_hf({arch.normalize_hf_name(n): t for n, t in hf_files.load_tensors(src).items()})
        state = hf_to_megalm_tensors(arch, ctx, hf_state)
        generation = os.path.join(src, "generation_config.json")
        record = {"model_type": arch.model_type, "vocab_size": vocab_size,
                  "config": {k: hf[k] for k in TOKEN_KEYS if k in hf},
                  "generation_config": hf_files.read_json(generation) if os.path.isfile(generation) else None}
        path = save_weights(dst, config, state, {"hf": record})
    log(f"converted {arch.hf_class} from {src} ({model_config.num_layers} layers, hidden "
        f"{model_config.hidden_size}, vocabulary {vocab_size} padded to {model_config.padded_vocab_size}) "
        f"into {path}")
    return path


def _tokenizer_config(tokenizer_dir: str, names: list, tokenizer, max_positions: int) -> dict:
    """A tokenizer_config.json for a checkpoint whose tokenizer did not come with one."""
    if "tokenizer.json" in names:
        klass = "PreTrainedTokenizerFast"
    elif "vocab.json" in names:
        klass = "GPT2TokenizerFast"
    else:
        klass = "LlamaTokenizer"
    out = {"tokenizer_class": klass, "model_max_length": max_positions, "clean_up_tokenization_spaces": False}
    if tokenizer is not None and tokenizer.eod is not None and "tokenizer.json" in names:
        from tokenizers import Tokenizer
        eos = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).id_to_token(tokenizer.eod)
        if eos is not None:
            out["eos_token"] = eos
    return out


SCORE = "score.weight"  # a reward model's head, under the name transformers gives it


def megalm_to_hf(src: str, dst: str, force: bool = False, architecture: Optional[str] = None,
                 max_shard_size="5GB", log=print) -> str:
    """Export the megalm checkpoint `src` (root or iter_XXXXXXX, any parallel layout) as a Hugging
    Face directory `dst`. A reward model (posttrain_gpt.py --task reward) becomes the family's
    *ForSequenceClassification with one label: its `score` head, no language-model head."""
    if os.path.exists(dst) and not force:
        raise ConversionError(f"output directory {dst} exists; choose another or pass --force to overwrite it")
    shard_bytes = hf_files.parse_size(max_shard_size)
    saved = Config.from_dict(read_metadata(checkpoint_dir(src))["config"]) if os.path.isdir(src) else None
    reward = saved is not None and saved.posttrain.task == "reward"
    found = open_checkpoint(src, specs={**partition_specs(saved), SCORE: None} if reward else None)
    score = found["model"].pop(SCORE, None) if reward else None
    if reward and score is None:
        raise ConversionError(f"{found['path']} is a reward model's checkpoint without its {SCORE} head")
    config = checkpoint_config(found)
    model_config = config.model
    record = found["metadata"].get("hf", {})
    arch = architecture_for_megalm(model_config, architecture or record.get("model_type"))

    check_tensors({n: t.shape for n, t in found["model"].items()},
                  {n: t.shape for n, t in meta_model(model_config).state_dict().items()}, found["path"])
    tokenizer = None
    if config.data.tokenizer_type not in (None, "NullTokenizer"):
        try:
            tokenizer = checkpoint_tokenizer(config)
        except Exception as e:  # the data pipeline raises DataError; a broken file anything
            log(f"warning: the checkpoint's tokenizer cannot be loaded ({e}); exporting the weights without it")
    _check_tokenizer_size(tokenizer, model_config.padded_vocab_size, f"padded vocabulary of {found['path']}")
    vocab_size = (record.get("vocab_size") or (tokenizer.vocab_size if tokenizer is not None else None)
                  or config.data.vocab_size or model_config.padded_vocab_size)
    ctx = Context(model_config, vocab_size)
    tensors = megalm_to_hf_tensors(arch, ctx, found["model"])
    hf_class = arch.hf_class
    if reward:
        hf_class = hf_class.replace("ForCausalLM", "ForSequenceClassification")
        tensors.pop("lm_head.weight", None)
        tensors[SCORE] = score

    hf_files.prepare_output_dir(dst, force)
    hf_files.save_tensors(tensors, dst, shard_bytes)
    hf_config = arch.hf_config(model_config, vocab_size)
    hf_config["torch_dtype"] = _DTYPE_NAMES.get(next(iter(tensors.values())).dtype, "float32")
    if reward:
        hf_config.update(architectures=[hf_class], num_labels=1)
        # transformers reads the score at the last token that is not padding; the EOS a completion
        # ends with is read, so an end-of-document id that doubles as padding is not declared.
        if tokenizer is not None and getattr(tokenizer, "pad", None) not in (None, tokenizer.eod):
            hf_config["pad_token_id"] = tokenizer.pad
    token_ids = dict(record.get("config", {}))
    if tokenizer is not None and tokenizer.eod is not None:
        token_ids.setdefault("eos_token_id", tokenizer.eod)
    hf_config.update(token_ids)
    hf_files.write_json(os.path.join(dst, "config.json"), hf_config)
    generation = record.get("generation_config") or {
        "_from_model_config": True, **{k: v for k, v in token_ids.items() if k in TOKEN_KEYS}}
    hf_files.write_json(os.path.join(dst, "generation_config.json"), generation)

    if tokenizer is not None:
        tokenizer_dir = os.path.join(found["path"], "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            tokenizer_dir = os.path.dirname(getattr(tokenizer, "path", "") or config.data.vocab_file or "")
        names = hf_files.copy_tokenizer_files(tokenizer_dir, dst) if tokenizer_dir else []
        if names and "tokenizer_config.json" not in names:
            hf_files.write_json(os.path.join(dst, "tokenizer_config.json"),
                                _tokenizer_config(dst, names, tokenizer, model_config.max_positions))
    log(f"exported {found['path']} as {hf_class} ({len(tensors)} tensors, vocabulary {vocab_size}) "
        f"into {dst}")
    return dst
