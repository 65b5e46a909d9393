"""LoRA and QLoRA adapters on megalm's tensor-parallel linears (Hu et al. 2021; Dettmers et al. 2023).

An adapted linear computes

    y = W x + b + s B A dropout(x)        A [r, in], B [out, r], s = alpha / r (rsLoRA: alpha / sqrt(r))

with W and b frozen and only A and B trained. A starts as Kaiming-uniform (a = sqrt(5)) and B at
zero, as Hugging Face peft initialises them, so training starts from the base model exactly.

Targets are named as in Hugging Face Llama / Qwen2 / Mistral (`q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj`, or `all-linear`). megalm fuses some of them, so one of its linears can
carry several adapters, each writing only its own rows of the fused output:

    linear_qkv  (column-parallel)  q_proj, k_proj, v_proj   rows in the grouped layout of
                                                            megalm.model.attention
    linear_proj (row-parallel)     o_proj
    linear_fc1  (column-parallel)  gate_proj, up_proj       [gate; up] under SwiGLU, else up_proj only
    linear_fc2  (row-parallel)     down_proj

Adapters sit on the attention, the dense MLPs and the shared experts of MoE layers; the routed
experts (one grouped GEMM over every expert's weights) get none and stay frozen, whatever the
targets say.

Tensor parallelism, with the adapter split like its base:

- column-parallel: A replicated, B split by output rows like W. The rank-r activations u = A x are
  computed before the collective the base applies to its input, and u goes through it instead of
  x (identity forward / all-reduce backward; with sequence parallelism all-gather / reduce-scatter
  along the sequence): A's gradient is then the full one on every rank (partial over the sequence
  under sequence parallelism, where A is marked like a norm weight and summed over the
  tensor-parallel group by `megalm.parallel.data_parallel`).
- row-parallel: A split by input columns like W, B replicated. The partial u = A_t x_t of every
  rank is reduced by the base's collective (all-reduce, or reduce-scatter along the sequence), on
  r features instead of `out`, and B is applied to the sum: B's gradient is complete on every rank
  without any extra reduction (with sequence parallelism B is marked like a norm weight).

An adapted linear keeps its class's forward and its parameter names (its class becomes the LoRA
subclass of its own class), so a LoRA model's state dict is the base model's plus
`<linear>.lora.<target>.A` / `.B`, and every checkpoint reader keeps working.

QLoRA (`--lora-base-quantization int8|int4`): the frozen weight of each adapted linear is held as
weight-only codes (`megalm.model.quantized`: int8 per output row, or int4 in groups of up to 128
input features) and de-quantized in the forward pass; the backward pass reaches the input and the
adapters only. The state dict still holds `<linear>.weight` (the de-quantized values), so a QLoRA
checkpoint is an ordinary megalm checkpoint, and a `weight` loaded into a QLoRA layer (a base
checkpoint, or a resumed run) is quantized on the way in.

Dropout draws one mask for the input of a linear's adapters (q, k and v share it), from the
default generator where that input is replicated over tensor-parallel ranks and from the
per-rank stream where it is split (`megalm.parallel.random`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megalm.checkpoint import CheckpointError, checkpoint_config, checkpoint_dir, open_checkpoint, read_metadata
from megalm.config import Config, PostTrainConfig
from megalm.model import GPTModel
from megalm.model.quantized import QuantizedLinear, quantize_rtn
from megalm.parallel import mappings
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear, mark_sharded, shard

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
QUANTIZATION_BITS = {"int8": 8, "int4": 4}
QUANTIZATION_GROUP = 128  # int4: input features per scale (gcd(in, 128) when in is not a multiple of it)
ADAPTER_MARK = ".lora."


def resolve_targets(names) -> Tuple[str, ...]:
    """The Hugging Face projection names `--lora-target-modules` selects, in TARGETS order."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"--lora-target-modules is empty; give some of {' '.join(TARGETS)}, or {ALL_LINEAR}")
    if ALL_LINEAR in names:
        return TARGETS
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {', '.join(unknown)}: megalm adapts the linears "
                         f"named {' '.join(TARGETS)} (Hugging Face Llama names), or {ALL_LINEAR}")
    return tuple(t for t in TARGETS if t in names)


def lora_scaling(config: PostTrainConfig) -> float:
    """s in y = W x + s B A x: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return config.lora_alpha / (math.sqrt(config.lora_rank) if config.use_rslora else config.lora_rank)


# ---------------------------------------------------------------------------------------- adapters

class LoRAAdapter(nn.Module):
    """One target's A and B on this rank, and the rows of the linear's local output it writes
    (`rows`: None when it writes all of them)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, rows: Optional[torch.Tensor]):
        super().__init__()
        self.A = nn.Parameter(A)  # [r, in] (row-parallel: [r, in / TP])
        self.B = nn.Parameter(B)  # [out, r] (column-parallel: [out / TP, r])
        self.register_buffer("rows", rows, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """B A in fp32: [out, in] of this rank."""
        return self.B.float() @ self.A.float()


class _LoRALinear:
    """What the adapted column- and row-parallel linears share: the base weight (the parameter, or
    under QLoRA the de-quantized codes), the adapters' dropout and their sum into the output."""

    lora: nn.ModuleDict
    lora_scaling: float
    lora_dropout: float
    lora_enabled = True  # False inside `adapters_disabled`: the base linear alone

    @property
    def weight(self) -> torch.Tensor:
        own = self._parameters.get("weight")
        return own if own is not None else self.weight_quantized.dequantize()

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.lora_dropout > 0):
            return x
        if self.tp > 1 and self._lora_input_split:
            with self.parallel.rng_tracker.fork():
                return F.dropout(x, self.lora_dropout, True)
        return F.dropout(x, self.lora_dropout, True)

    def _lora_output(self, u: torch.Tensor, out_features: int) -> torch.Tensor:
        """s x (each adapter's B u_i in its rows): u [.., n r] -> [.., out_features], as one matmul
        with the adapters' B side by side, each in its own rows (zeros elsewhere). Scattering each
        adapter's [.., out] product into its rows instead costs an activation-sized scatter, and its
        backward a gather, per adapter."""
        r = u.shape[-1] // len(self.lora)
        blocks = []
        for adapter in self.lora.values():
            B = adapter.B.to(u.dtype)
            if adapter.rows is not None:
                B = B.new_zeros(out_features, r).index_copy(0, adapter.rows, B)
            blocks.append(B)
        return (u @ torch.cat(blocks, dim=1).t()) * self.lora_scaling

    def _lora_A(self) -> torch.Tensor:
        return torch.cat([a.A for a in self.lora.values()])  # [n r, in]


class LoRAColumnParallelLinear(_LoRALinear, ColumnParallelLinear):
    @property
    def _lora_input_split(self) -> bool:
        return self.sequence_parallel  # replicated otherwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [b, s, out / TP]
        if not self.lora_enabled:
            return y
        u = F.linear(self._lora_input(x), self._lora_A().to(x.dtype))  # [b, s(/TP), n r]
        if self.tp > 1:
            u = (mappings.gather_from_sequence_parallel_region(u, self.group) if self.sequence_parallel
                 else mappings.copy_to_tensor_parallel_region(u, self.group))
        return y + self._lora_output(u, y.shape[-1]).to(y.dtype)


class LoRARowParallelLinear(_LoRALinear, RowParallelLinear):
    _lora_input_split = True  # this rank's input features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [b, s(/TP), out], reduced
        if not self.lora_enabled:
            return y
        u = F.linear(self._lora_input(x), self._lora_A().to(x.dtype))  # [b, s, n r] partial sum
        if self.tp > 1:
            u = (mappings.reduce_scatter_to_sequence_parallel_region(u, self.group) if self.sequence_parallel
                 else mappings.reduce_from_tensor_parallel_region(u, self.group))
        return y + self._lora_output(u, y.shape[-1]).to(y.dtype)


_ADAPTED = {ColumnParallelLinear: LoRAColumnParallelLinear, RowParallelLinear: LoRARowParallelLinear}
_BASE = {v: k for k, v in _ADAPTED.items()}


# ---------------------------------------------------------------------------------------- where

def _projections(kind: str, linear: nn.Module, config, tp: int) -> Dict[str, Tuple[int, Optional[torch.Tensor]]]:
    """Target name -> (its full output features, its rows in this rank's local output or None)."""
    if kind == "qkv":
        groups, r, d = config.query_groups // tp, config.num_attention_heads // config.query_groups, config.head_dim
        index = torch.arange(groups * (r + 2) * d).view(groups, r + 2, d)
        return {"q_proj": (config.num_attention_heads * d, index[:, :r].reshape(-1)),
                "k_proj": (config.query_groups * d, index[:, r].reshape(-1)),
                "v_proj": (config.query_groups * d, index[:, r + 1].reshape(-1))}
    if kind == "fc1":
        ffn = linear.output_size // linear.stacked
        if linear.stacked == 1:
            return {"up_proj": (ffn, None)}
        local = ffn // tp
        return {"gate_proj": (ffn, torch.arange(local)), "up_proj": (ffn, torch.arange(local, 2 * local))}
    return {{"proj": "o_proj", "fc2": "down_proj"}[kind]: (linear.output_size, None)}


def _linears(model: nn.Module):
    """(name, linear, kind) of every linear of the model's layers that can take adapters."""
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        kind = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}.get(leaf)
        if kind is not None and ".experts." not in name and type(module) in _ADAPTED:
            yield name, module, kind


def _layer_number(name: str) -> int:
    return int(name.split(".")[1])


# ---------------------------------------------------------------------------------------- apply

def _new_adapter(linear: nn.Module, full_out: int, rows, rank: int, seed: int, parallel: ParallelState) -> LoRAAdapter:
    """A (Kaiming-uniform, drawn whole from `seed` then split like the base) and B (zeros) for one target."""
    tp, tp_rank = parallel.tensor_model_parallel_size, parallel.tensor_model_parallel_rank
    generator = torch.Generator().manual_seed(seed)
    A = torch.empty(rank, linear.input_size)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    B = torch.zeros(full_out, rank)
    column = isinstance(linear, ColumnParallelLinear)
    A = A if column else shard(A, 1, tp_rank, tp)
    B = shard(B, 0, tp_rank, tp) if column else B
    device, dtype = linear.weight.device, linear.weight.dtype
    adapter = LoRAAdapter(A.to(device, dtype), B.to(device, dtype), None if rows is None else rows.to(device))
    split, replicated = (adapter.B, adapter.A) if column else (adapter.A, adapter.B)
    mark_sharded(split, 0 if column else 1)
    if parallel.sequence_parallel:  # the replicated half saw only this rank's part of the sequence
        replicated.sequence_parallel = True
    return adapter


def _quantize_base(linear: nn.Module, bits: int) -> None:
    """Hold the linear's weight as codes (its parameter goes) and quantize any `weight` loaded later."""
    weight = linear._parameters.pop("weight")
    out, n = weight.shape
    group = n if bits == 8 else math.gcd(n, QUANTIZATION_GROUP)
    linear.weight_quantized = QuantizedLinear(n, out, bits, group, bias=False, device=weight.device,
                                              persistent=False)
    _set_codes(linear, weight.detach())
    linear.register_state_dict_post_hook(_dequantized_weight_into_state_dict)
    linear.register_load_state_dict_pre_hook(_quantize_loaded_weight)


def _set_codes(linear: nn.Module, weight: torch.Tensor) -> None:
    q = linear.weight_quantized
    codes, scales, zeros = quantize_rtn(weight, q.bits, q.group_size, symmetric=False)
    q.set_codes(codes.to(q.qweight.device), scales.to(q.qweight.device),
                zeros.to(q.qweight.device) if q.bits == 4 else None)


def _dequantized_weight_into_state_dict(module, state_dict, prefix, local_metadata) -> None:
    if "weight" not in module._parameters:
        state_dict[prefix + "weight"] = module.weight_quantized.dequantize()


def _quantize_loaded_weight(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs) -> None:
    if "weight" in module._parameters:
        return
    weight = state_dict.pop(prefix + "weight", None)
    if weight is None:
        missing_keys.append(prefix + "weight")
    elif tuple(weight.shape) != (module.weight_quantized.out_features, module.weight_quantized.in_features):
        error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(weight.shape)}, "
                          f"the quantized weight has {module.weight_quantized.out_features} x "
                          f"{module.weight_quantized.in_features}")
    elif weight.device.type != "meta":
        _set_codes(module, weight.to(module.weight_quantized.qweight.device))


_QLORA_HOOKS = (_dequantized_weight_into_state_dict, _quantize_loaded_weight)


def apply_lora(model: nn.Module, config: PostTrainConfig, parallel_state: Optional[ParallelState] = None) -> List[str]:
    """Freeze every parameter of the GPTModel chunk `model` and give the target linears adapters,
    in place; returns the names of the adapted linears.

    Each adapter's A is drawn from a seed derived from one draw of the global generator and its
    global layer number: call this right after building the chunk (as `GPTModel` draws its own
    seed), and every tensor- or pipeline-parallel rank holds the slices of the single-process A.
    """
    if config.lora_rank < 0:
        raise ValueError(f"--lora-rank must not be negative, got {config.lora_rank}")
    if config.lora_rank == 0:
        raise ValueError("--lora-rank is 0 (full fine-tuning): give --lora-rank R to train LoRA adapters")
    if config.lora_base_quantization is not None and config.lora_base_quantization not in QUANTIZATION_BITS:
        raise ValueError(f"--lora-base-quantization {config.lora_base_quantization!r}: choose one of "
                         f"{', '.join(QUANTIZATION_BITS)}")
    targets = resolve_targets(config.lora_target_modules)
    if adapted_linears(model):
        raise ValueError("the model has LoRA adapters already: merge them (merge_lora) before adding others")
    parallel = parallel_state or ParallelState()
    seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, linear, kind in list(_linears(model)):
        wanted = {t: spec for t, spec in _projections(kind, linear, model.config, parallel.tensor_model_parallel_size).items()
                  if t in targets}
        if not wanted:
            continue
        layer = _layer_number(name)
        adapters = nn.ModuleDict({t: _new_adapter(linear, full_out, rows, config.lora_rank,
                                                  seed + len(TARGETS) * layer + TARGETS.index(t), parallel)
                                  for t, (full_out, rows) in wanted.items()})
        linear.__class__ = _ADAPTED[type(linear)]
        linear.lora = adapters
        linear.lora_scaling = lora_scaling(config)
        linear.lora_dropout = config.lora_dropout
        if config.lora_base_quantization is not None:
            _quantize_base(linear, QUANTIZATION_BITS[config.lora_base_quantization])
        adapted.append(name)
    if not adapted:
        raise ValueError(f"no linear of this model matches --lora-target-modules {' '.join(targets)}")
    return adapted


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold s B A into the base weights (in fp32, then the weight's dtype; QLoRA: into the
    de-quantized weight) and remove the adapters: the plain model, its parameters still frozen."""
    for _, linear in adapted_linears(model):
        weight = linear.weight.float().clone()
        for adapter in linear.lora.values():
            delta = linear.lora_scaling * adapter.delta_weight()
            if adapter.rows is None:
                weight += delta
            else:
                weight.index_add_(0, adapter.rows, delta)
        original = linear._parameters.get("weight")
        dtype = original.dtype if original is not None else torch.float32
        attributes = dict(vars(original)) if original is not None else {}
        for name in ("lora", "weight_quantized", "lora_scaling", "lora_dropout"):
            if hasattr(linear, name):
                delattr(linear, name)
        for hooks in (linear._state_dict_hooks, linear._load_state_dict_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "hook", h) in _QLORA_HOOKS]:
                del hooks[key]
        linear.__class__ = _BASE[type(linear)]
        linear._parameters.pop("weight", None)
        merged = nn.Parameter(weight.to(dtype), requires_grad=False)
        merged.__dict__.update(attributes)
        if not attributes:
            mark_sharded(merged, linear.partition_dim, linear.stacked)
        linear.weight = merged
    return model


# ---------------------------------------------------------------------------------------- queries

def adapted_linears(model: nn.Module):
    """(name, linear) of every linear with adapters."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block `model` computes as its base model: every adapter's branch is skipped (the
    reference policy of DPO and GRPO under LoRA, with no second copy of the weights)."""
    linears = [linear for _, linear in adapted_linears(model)]
    for linear in linears:
        linear.lora_enabled = False
    try:
        yield model
    finally:
        for linear in linears:
            del linear.lora_enabled  # back to the class's True


def is_adapter(name: str) -> bool:
    """Is this state-dict / parameter name an adapter's A or B?"""
    return ADAPTER_MARK in name


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters' tensors, by their names in the model's state dict."""
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def load_weights(model: nn.Module, weights: Dict[str, torch.Tensor]) -> List[str]:
    """Load `weights` strictly, except that a checkpoint without adapters (the base model) leaves
    them as they are; returns the adapter names it did not hold."""
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not is_adapter(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"the weights do not match the model: missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]}")
    return list(result.missing_keys)


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameters; a quantized base weight counts its out x in elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.weight_quantized.in_features * m.weight_quantized.out_features
                 for _, m in adapted_linears(model) if "weight" not in m._parameters)
    return trainable, total


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base: its parameters and, under QLoRA, the codes, scales and zero points."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    codes = sum(b.numel() * b.element_size() for _, m in adapted_linears(model) if hasattr(m, "weight_quantized")
                for b in m.weight_quantized.buffers())
    return frozen + codes


def describe(model: nn.Module, config: PostTrainConfig) -> str:
    """One log line: rank, scale, adapted linears, trainable share, base weight memory."""
    trainable, total = parameter_counts(model)
    quantized = f" ({config.lora_base_quantization})" if config.lora_base_quantization else ""
    return (f"LoRA: rank {config.lora_rank}, alpha {config.lora_alpha:g} (scale {lora_scaling(config):g}"
            f"{', rsLoRA' if config.use_rslora else ''}), {len(adapted_linears(model))} linears | trainable "
            f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%) | base weights "
            f"{base_weight_bytes(model) / 2 ** 20:.1f} MB{quantized}")


# ---------------------------------------------------------------------------------------- checkpoints

def lora_model(config: Config, device=None) -> GPTModel:
    """The single-process model of a LoRA checkpoint's config, with its adapters and a plain
    (not quantized) base: the shape its saved weights load into."""
    with torch.device(device or "cpu"):
        model = GPTModel(config.model)
    apply_lora(model, dataclasses.replace(config.posttrain, lora_base_quantization=None))
    return task_head(model, config)


def task_head(model: GPTModel, config: Config) -> GPTModel:
    """`model` with the head its task adds beside the adapters: a reward model's `score`."""
    if config.posttrain.task == "reward":
        from megalm.posttrain.heads import add_score_head
        add_score_head(model, config)
    return model


def partition_specs(config: Config) -> Dict[str, Optional[tuple]]:
    """Parameter name -> (partition_dim, stacked) or None, adapters included (for merging the
    tensor-parallel shards of a LoRA checkpoint, `megalm.checkpoint.merge`)."""
    return {name: (p.partition_dim, p.partition_stacked) if hasattr(p, "partition_dim") else None
            for name, p in lora_model(config, "meta").named_parameters()}


def open_lora_checkpoint(path: str) -> Tuple[dict, Config]:
    """A LoRA checkpoint (any layout) with its full weights, adapters included, and its config."""
    meta = read_metadata(checkpoint_dir(path))
    config = Config.from_dict(meta["config"])
    if not config.posttrain.lora_rank:
        raise CheckpointError(f"{path} holds no LoRA adapters (its config has --lora-rank 0): it is a plain "
                              f"megalm checkpoint already")
    found = open_checkpoint(path, specs=partition_specs(config))
    return found, checkpoint_config(found)


def merged_weights(found: dict, config: Config) -> Dict[str, torch.Tensor]:
    """The plain model's weights of an opened LoRA checkpoint: each s B A folded into its base in fp32."""
    model = lora_model(config)
    model.load_state_dict(found["model"], strict=True)
    return merge_lora(model).state_dict()


def without_lora(config: Config) -> Config:
    """The config of the merged model: the LoRA settings back to their defaults."""
    defaults = PostTrainConfig()
    posttrain = dataclasses.replace(config.posttrain, **{f.name: getattr(defaults, f.name)
                                                         for f in dataclasses.fields(PostTrainConfig)
                                                         if f.name.startswith("lora_") or f.name == "use_rslora"})
    return dataclasses.replace(config, posttrain=posttrain)
