"""The shared frame of every checkpoint mapping: rules that turn megalm tensors into HF tensors and back.

An architecture is one table of `Rule`s. A rule ties one megalm tensor to the one or more Hugging
Face tensors it is made of, and its `Transform` converts in both directions:

    Rule("layers.{layer}.self_attention.linear_qkv.weight",
         ("model.layers.{layer}.self_attn.q_proj.weight", ".k_proj.weight", ".v_proj.weight"),
         QKV())

Templates hold `{layer}`, expanded over the layers. A transform sees the `Context` (the model config
and the true vocabulary size) and must be exact: converting there and back gives the same bits.
Transforms only reshape, slice, concatenate and transpose, so they also run on meta tensors: the
frame converts the state dict of a meta-device model to learn which HF names and shapes a config
implies, and checks a checkpoint against them before touching any data.

A mixture-of-experts table adds rules whose HF side lists one tensor per expert (Mixtral, DeepSeek
in transformers 4) or one fused [experts, ...] tensor (transformers 5) on this same frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megalm.config import ModelConfig


class ConversionError(RuntimeError):
    """A checkpoint or request that cannot be converted; the message says what and where."""


@dataclass(frozen=True)
class Context:
    config: ModelConfig
    vocab_size: int  # the tokenizer's true vocabulary: the embedding rows Hugging Face stores


class Transform:
    def to_hf(self, tensor: Tensor, ctx: Context) -> Sequence[Tensor]:
        raise NotImplementedError

    def to_megalm(self, tensors: Sequence[Tensor], ctx: Context) -> Tensor:
        raise NotImplementedError


def _t(x: Tensor) -> Tensor:
    """Transpose a Conv1D weight ([in, out] <-> [out, in]); biases stay as they are."""
    return x.t() if x.dim() == 2 else x


class Copy(Transform):
    """The same tensor on both sides; `conv1d` for GPT-2's [in, out] weights."""

    def __init__(self, conv1d: bool = False):
        self.conv1d = conv1d

    def to_hf(self, tensor, ctx):
        return [_t(tensor) if self.conv1d else tensor]

    def to_megalm(self, tensors, ctx):
        return _t(tensors[0]) if self.conv1d else tensors[0]


class Vocab(Transform):
    """Embedding / output rows: Hugging Face keeps the true vocabulary, megalm pads it with zeros to
    `padded_vocab_size` (Megatron's --make-vocab-size-divisible-by)."""

    def to_hf(self, tensor, ctx):
        return [tensor[:ctx.vocab_size]]

    def to_megalm(self, tensors, ctx):
        pad = ctx.config.padded_vocab_size - tensors[0].shape[0]
        return F.pad(tensors[0], (0, 0, 0, pad)) if pad > 0 else tensors[0]


class QKV(Transform):
    """megalm's grouped query/key/value rows [g0: q0..q{r-1}, k, v | g1: ...] <-> separate q, k, v
    (Llama: q_proj, k_proj, v_proj) or one [q; k; v] tensor (GPT-2's c_attn, `fused`)."""

    def __init__(self, fused: bool = False, conv1d: bool = False):
        self.fused, self.conv1d = fused, conv1d

    @staticmethod
    def _shape(ctx: Context):
        c = ctx.config
        return c.query_groups, c.num_attention_heads // c.query_groups, c.head_dim

    def to_hf(self, tensor, ctx):
        g, r, d = self._shape(ctx)
        rest = tensor.shape[1:]
        grouped = tensor.reshape(g, r + 2, d, *rest)
        q = grouped[:, :r].reshape(g * r * d, *rest)
        k = grouped[:, r].reshape(g * d, *rest)
        v = grouped[:, r + 1].reshape(g * d, *rest)
        parts = [torch.cat((q, k, v))] if self.fused else [q, k, v]
        return [_t(p) for p in parts] if self.conv1d else parts

    def to_megalm(self, tensors, ctx):
        g, r, d = self._shape(ctx)
        tensors = [_t(x) for x in tensors] if self.conv1d else list(tensors)
        if self.fused:
            nq = g * r * d
            tensors = [tensors[0][:nq], tensors[0][nq:nq + g * d], tensors[0][nq + g * d:]]
        q, k, v = tensors
        rest = q.shape[1:]
        grouped = torch.cat((q.reshape(g, r, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)), 1)
        return grouped.reshape(g * (r + 2) * d, *rest)


class Concat(Transform):
    """Tensors stacked along rows: SwiGLU's fc1 = [gate; up], gate first."""

    def to_hf(self, tensor, ctx):
        return list(tensor.chunk(2, dim=0))

    def to_megalm(self, tensors, ctx):
        return torch.cat(tuple(tensors), dim=0)


@dataclass(frozen=True)
class Rule:
    megalm: str
    hf: tuple
    transform: Transform = dataclasses.field(default_factory=Copy)


class Architecture:
    """One Hugging Face model family: its config translation and its table of rules."""

    model_type: str = ""
    hf_class: str = ""
    # Tensors some Hugging Face checkpoints carry that are not weights (buffers of older versions).
    ignored_suffixes: tuple = ()

    def model_config(self, hf: dict) -> dict:
        """HF config.json -> ModelConfig keyword arguments (raise ConversionError if unsupported)."""
        raise NotImplementedError

    def hf_config(self, config: ModelConfig, vocab_size: int) -> dict:
        """ModelConfig -> the architecture part of config.json."""
        raise NotImplementedError

    def rules(self, config: ModelConfig) -> list:
        raise NotImplementedError

    def matches(self, config: ModelConfig) -> bool:
        """Whether this family can hold a megalm model of this config (for export)."""
        raise NotImplementedError

    def normalize_hf_name(self, name: str) -> str:
        return name

    def unfuse_hf(self, named: dict) -> dict:
        """Rewrite a checkpoint's {name: tensor or shape} into the layout the rules read; the
        identity except for families whose tensors may be stored fused."""
        return named

    def is_ignored(self, name: str) -> bool:
        return name.endswith(self.ignored_suffixes) if self.ignored_suffixes else False


def _expand(template: str, layer: Optional[int]) -> str:
    return template.format(layer=layer) if layer is not None else template


def _expanded_rules(arch: Architecture, config: ModelConfig):
    for rule in arch.rules(config):
        layers = range(config.num_layers) if "{layer}" in rule.megalm else [None]
        for layer in layers:
            yield _expand(rule.megalm, layer), [_expand(h, layer) for h in rule.hf], rule.transform


def megalm_to_hf_tensors(arch: Architecture, ctx: Context, state: dict) -> dict:
    """megalm state dict -> HF state dict (every megalm tensor must be covered by a rule)."""
    out, used = {}, set()
    for name, hf_names, transform in _expanded_rules(arch, ctx.config):
        if name not in state:
            raise ConversionError(f"missing tensor {name} in the megalm checkpoint")
        used.add(name)
        for hf_name, tensor in zip(hf_names, transform.to_hf(state[name], ctx)):
            out[hf_name] = tensor
    extra = sorted(set(state) - used)
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]} in the megalm checkpoint "
                              f"({len(extra)} extra in all) for a {arch.hf_class} model")
    return out


def hf_to_megalm_tensors(arch: Architecture, ctx: Context, hf_state: dict) -> dict:
    out = {}
    for name, hf_names, transform in _expanded_rules(arch, ctx.config):
        out[name] = transform.to_megalm([hf_state[h] for h in hf_names], ctx)
    return out


def check_tensors(found: dict, expected: dict, where: str, ignore: Callable[[str], bool] = lambda n: False):
    """Compare name -> shape maps; raise ConversionError for the first missing, extra or misshapen
    tensor, naming it (and both shapes)."""
    missing = [n for n in expected if n not in found]
    if missing:
        raise ConversionError(f"missing tensor {missing[0]} in {where} ({len(missing)} missing in all)")
    extra = sorted(n for n in found if n not in expected and not ignore(n))
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]} in {where} ({len(extra)} extra in all); "
                              f"the config does not describe it")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ConversionError(f"shape mismatch for {name} in {where}: {list(found[name])} in the file, "
                                  f"{list(shape)} expected from the config")
