"""FP8 training of the column- and row-parallel linears (`--fp8-format`, `--fp8-recipe`).

Each linear's three GEMMs run on FP8 operands (megalm.kernels.fp8), every operand scaled along the
GEMM's reduction dimension, with fp32 master weights and bf16 outputs:

    forward  y  = x @ w^T      x [m, k], w [n, k]   (E4M3)
    dgrad    dx = g @ w        g [m, n]             (E5M2 with --fp8-format hybrid, else E4M3)
    wgrad    dw = g^T @ x

Recipes (where each scale comes from):
- ``tensorwise``: one scale per tensor from its own amax, every time it is cast;
- ``rowwise``: one scale per row along the reduction dimension (x and g per token for the forward
  and dgrad, per feature for the wgrad), so an outlier token spoils only its own row;
- ``delayed`` (Transformer Engine's): one scale per tensor from the amax of the previous steps
  (the last `--fp8-amax-history-len` of them, `--fp8-amax-compute-algo` max or most_recent), so no
  reduction has to finish before the cast. The amax of the step is recorded while it runs and the
  scales move once per optimizer step (`update_delayed_scaling`), so every micro-batch and every
  recomputed forward of a step casts alike. A tensor without history (the first step) scales by
  its own amax. The history and scales are saved with the optimizer state (`fp8_state_dict`).

Tensor parallelism: an amax taken over a dimension that is split across the tensor-parallel ranks
is all-reduced (max) over the group, so every rank casts its shard with the scale the unsplit
tensor would get and TP=N computes what TP=1 computes (up to the order of the sums). Which
dimension of x, w and g is split depends on the layer: column-parallel splits n (w dim 0, g dim 1),
row-parallel splits k (x dim 1, w dim 1); with sequence parallelism the column layer's input is
gathered before the GEMM, so the rule is the same. Delayed scaling reduces its recorded amax over
the tensor-, data- and context-parallel groups once per step instead, so all replicas keep one
history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megalm.config import ModelConfig
from megalm.kernels.fp8 import E4M3, E5M2, Fp8Tensor, amax, fp8_gemm, quantize, scale_from_amax
from megalm.parallel.state import ParallelState

INPUT, WEIGHT, GRAD = 0, 1, 2  # the tensors of a linear that are cast, in the order of the buffers
ShardedDims = Tuple[Optional[int], Optional[int], Optional[int]]  # split dim of x [m, k], w [n, k], g [m, n]


@dataclass(frozen=True)
class Fp8Recipe:
    format: str = "hybrid"  # e4m3 | hybrid
    recipe: str = "delayed"  # tensorwise | rowwise | delayed
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"  # max | most_recent

    def dtype(self, role: int) -> torch.dtype:
        return E5M2 if role == GRAD and self.format == "hybrid" else E4M3


def layer_recipe(config: ModelConfig, layer_number: int) -> Optional[Fp8Recipe]:
    """The FP8 recipe of transformer layer `layer_number` (0-based), or None where it stays in bf16
    (no --fp8-format, or one of the first / last layers that --first-last-layers-bf16 keeps)."""
    if config.fp8_format is None:
        return None
    if config.first_last_layers_bf16 and not (
            config.num_layers_at_start_in_bf16 <= layer_number < config.num_layers - config.num_layers_at_end_in_bf16):
        return None
    return Fp8Recipe(config.fp8_format, config.fp8_recipe, config.fp8_amax_history_len, config.fp8_amax_compute_algo)


class Fp8State(nn.Module):
    """How one linear casts its input, weight and output gradient: the recipe, the tensor-parallel
    group and split dims for the amax reduction, and (delayed recipe) the amax history [len, 3] and
    scales [3] of the three tensors. The buffers are not in the model's state dict: a checkpoint
    keeps them with the optimizer state, so weights load the same with and without FP8."""

    def __init__(self, recipe: Fp8Recipe, group: Optional[dist.ProcessGroup], sharded: ShardedDims):
        super().__init__()
        self.recipe, self.group = recipe, group
        self.sharded = sharded if group is not None else (None, None, None)
        self.per_tensor = recipe.recipe != "rowwise"
        self.delayed = recipe.recipe == "delayed"
        self.has_history = False
        if self.delayed:
            self.register_buffer("amax_history", torch.zeros(recipe.amax_history_len, 3), persistent=False)
            self.register_buffer("scale", torch.ones(3), persistent=False)

    def cast(self, t: Tensor, role: int, dim: int) -> Fp8Tensor:
        """t (x [m, k], w [n, k] or g [m, n]) in FP8 for a GEMM that reduces over `dim` of t."""
        dtype = self.recipe.dtype(role)
        if self.delayed and self.has_history:
            if self.training:  # rank-local: update_delayed_scaling reduces it over the groups once per step
                self._record(role, amax(t))
            return quantize(t, self.scale[role].clone(), dtype)
        current = amax(t, None if self.per_tensor else dim)
        split = self.sharded[role]
        if split is not None and (self.per_tensor or split == dim):
            dist.all_reduce(current, op=dist.ReduceOp.MAX, group=self.group)
        if self.delayed and self.training:
            self._record(role, current)
        return quantize(t, scale_from_amax(current, dtype), dtype)

    def _record(self, role: int, value: Tensor) -> None:
        # The step's amax: the max over its micro-batches (and recomputed forwards, which change nothing).
        self.amax_history[0, role] = torch.maximum(self.amax_history[0, role], value)

    def step(self, current: Tensor) -> None:
        """End of an optimizer step: `current` [3] is the step's amax, reduced over the replicas."""
        history = self.amax_history
        history[0] = current
        seen = history[0] if self.recipe.amax_compute_algo == "most_recent" else history.amax(dim=0)
        for role in (INPUT, WEIGHT, GRAD):
            # An amax of 0 (nothing seen) or inf / NaN (an overflowing, skipped step) keeps the last scale.
            usable = torch.isfinite(seen[role]) & (seen[role] > 0)
            self.scale[role] = torch.where(usable, scale_from_amax(seen[role], self.recipe.dtype(role)),
                                           self.scale[role])
        history.copy_(history.roll(1, dims=0))
        history[0] = 0
        self.has_history = True

    def extra_repr(self) -> str:
        r = self.recipe
        return f"format={r.format}, recipe={r.recipe}" + (
            f", amax_history_len={r.amax_history_len}, amax_compute_algo={r.amax_compute_algo}" if self.delayed else "")


class _Fp8Matmul(torch.autograd.Function):
    """x [m, k] @ w [n, k]^T with FP8 GEMMs forward and backward; y in `out_dtype`."""

    @staticmethod
    def forward(ctx, x, w, state: Fp8State, out_dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            xq, wq = state.cast(x, INPUT, 1), state.cast(w, WEIGHT, 1)
            y = fp8_gemm(xq, wq, out_dtype)
        ctx.state, ctx.x_dtype, ctx.out_dtype = state, x.dtype, out_dtype
        if state.per_tensor:  # the backward reuses the forward's casts (a tensor-wide scale fits any GEMM)
            ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)
        else:
            ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, g):
        state = ctx.state
        with torch.autocast(g.device.type, enabled=False):
            if state.per_tensor:
                x_data, x_scale, w_data, w_scale = ctx.saved_tensors
                x_cols, w_cols = Fp8Tensor(x_data, x_scale), Fp8Tensor(w_data, w_scale)
                g_rows = g_cols = state.cast(g, GRAD, 1)
            else:
                x, w = ctx.saved_tensors
                x_cols, w_cols = state.cast(x, INPUT, 0), state.cast(w, WEIGHT, 0)
                g_rows, g_cols = state.cast(g, GRAD, 1), state.cast(g, GRAD, 0)
            # Both in the GEMM's output dtype (bf16), as autocast's F.linear gives them.
            dx = fp8_gemm(g_rows, w_cols.t(), ctx.out_dtype).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            dw = fp8_gemm(g_cols.t(), x_cols.t(), ctx.out_dtype) if ctx.needs_input_grad[1] else None  # [n, k]
        return dx, dw, None, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Fp8State) -> Tensor:
    """F.linear with FP8 GEMMs: x [.., k], weight [n, k] -> [.., n] in the autocast dtype (bf16)."""
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, state, out_dtype)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(out_dtype)


def _delayed_states(chunks: Iterable[nn.Module]):
    return [(name, m) for chunk in chunks for name, m in chunk.named_modules()
            if isinstance(m, Fp8State) and m.delayed]


def update_delayed_scaling(chunks: Iterable[nn.Module], state: ParallelState) -> None:
    """After each optimizer step: reduce the step's amax of every delayed-scaling linear over the
    tensor-, data- and context-parallel groups (one all-reduce each for the whole model) and move
    the histories and scales on."""
    states = [m for _, m in _delayed_states(chunks)]
    if not states:
        return
    current = torch.stack([m.amax_history[0] for m in states])  # [linears, 3]
    for group in (state.tensor_model_parallel_group, state.data_parallel_group, state.context_parallel_group):
        if group is not None:
            dist.all_reduce(current, op=dist.ReduceOp.MAX, group=group)
    for m, c in zip(states, current):
        m.step(c)


def fp8_state_dict(chunks: Iterable[nn.Module]) -> dict:
    """The delayed-scaling state of this rank's linears, by module name (empty for other recipes)."""
    return {name: {"amax_history": m.amax_history.cpu().clone(), "scale": m.scale.cpu().clone(),
                   "has_history": m.has_history} for name, m in _delayed_states(chunks)}


def load_fp8_state(chunks: Iterable[nn.Module], saved: dict) -> int:
    """Restore what `fp8_state_dict` saved; returns how many linears found their state. A history of
    another length keeps its newest entries (or pads with zeros); a linear the checkpoint lacks (a
    run that trained without delayed FP8) starts a fresh history."""
    found = 0
    for name, m in _delayed_states(chunks):
        if name not in saved:
            continue
        history = saved[name]["amax_history"].to(m.amax_history.device)
        keep = min(len(history), len(m.amax_history))
        with torch.no_grad():
            m.amax_history.zero_()
            m.amax_history[:keep] = history[:keep]
            m.scale.copy_(saved[name]["scale"])
        m.has_history = bool(saved[name]["has_history"])
        found += 1
    return found
