"""Weight-only quantization of the transformer's linear layers: INT8, INT4 and GPTQ INT4.

Methods (the embedding, the output layer and the norms stay in full precision):

- ``int8``: per output channel, symmetric absmax: scale = max|w_row| / 127, q = round(w / scale)
  in [-127, 127], stored int8.
- ``int4``: round to nearest in groups of `group_size` (128) consecutive input features per output
  row (a layer with fewer input features has one group per row). Asymmetric by default: the
  group's range [min(w, 0), max(w, 0)] maps onto 0..15 with scale = (max - min) / 15 and an
  integer zero point z = round(-min / scale), w ~ (q - z) * scale (the error is at most half a
  step inside the range and one step at its ends, where the rounded zero point shifts the grid).
  Symmetric (``symmetric=True``): scale = max|w| / 7 and z = 8, so q - 8 spans [-7, 7] (no clipping;
  the code 0 = -8 stays unused). Two 4-bit codes share a byte: the even input feature in the low
  nibble, the odd one in the high nibble.
- ``gptq-int4``: the same storage, with the codes chosen by GPTQ (Frantar et al., 2022): for a
  linear layer with calibration inputs X, it minimises ||W X - Q X||^2 one input column at a time,
  moving each column's rounding error onto the columns not yet quantized through the inverse of
  H = 2 X X^T (1% of its mean diagonal added as damping), by Cholesky factors, in blocks of 128
  columns with a lazy update of the rest. Each group's scale and zero point are set from the
  (already error-corrected) weights when quantization reaches its first column. With ``act_order``
  the columns are visited by decreasing H diagonal and the grids come from the original weights
  ("static groups"), so the stored layout is the same. Layers are quantized in order, each one
  calibrated on the outputs of the layers already quantized.

Scales are stored fp16 and the zero points uint8 (one byte per group). `QuantizedLinear` replaces
each linear: it dequantizes its weight and calls `F.linear` (a reference path, no fused kernel).

Mixture-of-experts layers: the routed experts, most of such a model's weights, are quantized too
(`QuantizedExperts`): every expert's fc1 [2 ffn, h] and fc2 [h, ffn] like a linear (rows per
expert, groups along its input features), the forward dequantizing them for the same grouped
GEMMs. GPTQ calibrates each expert on the rows routed to it (fc2 on the SwiGLU of those rows
through the original fc1); an expert that received no calibration row is rounded to nearest. The
router stays in full precision: the choice of experts must not move.
`megalm.inference.loading` saves and loads a quantized model.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

# The storage and round to nearest live with the layers (QLoRA training uses them too); they are
# part of this module's interface.
from megalm.model.quantized import QuantizedLinear, _codes, _grid, pack_int4, quantize_rtn, unpack_int4  # noqa: F401
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear

METHODS = ("int8", "int4", "gptq-int4")


# ---- the experts' module ----------------------------------------------------------------------

class QuantizedExperts(nn.Module):
    """The routed experts of an MoE layer (`megalm.model.moe.GroupedExperts`) with quantized weights:
    fc1 [E, 2 ffn, h] and fc2 [E, h, ffn], each stored as one `QuantizedLinear` of E x rows."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, bits: int, group_size: int, device=None):
        super().__init__()
        self.num_experts, self.hidden, self.ffn = num_experts, hidden, ffn
        self.fc1 = QuantizedLinear(hidden, num_experts * 2 * ffn, bits, group_size, False, device=device)
        self.fc2 = QuantizedLinear(ffn, num_experts * hidden, bits, group_size, False, device=device)

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        from megalm.model.moe import swiglu_experts
        w1 = self.fc1.dequantize().view(self.num_experts, 2 * self.ffn, self.hidden)
        w2 = self.fc2.dequantize().view(self.num_experts, self.hidden, self.ffn)
        return swiglu_experts(x, w1, w2, tokens_per_expert)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, ffn={self.ffn}, bits={self.fc1.bits}"


# ---- round to nearest and GPTQ for one weight --------------------------------------------------

def quantize_gptq(w: Tensor, hessian: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                  act_order: bool = False, block_size: int = 128, damp: float = 0.01):
    """GPTQ codes for w [out, in] given H = sum of x x^T over calibration inputs [in, in].
    Returns the same triple as `quantize_rtn`."""
    W = w.float().clone()
    H = hessian.float().clone()
    out, n = W.shape
    g = n if bits == 8 else min(group_size, n)
    symmetric = symmetric or bits == 8
    if g % block_size and block_size % g:
        block_size = g
    dead = H.diagonal() == 0  # inputs that are always zero: any value works, use 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales = torch.zeros(out, n // g)
    zeros = torch.zeros(out, n // g)
    perm = torch.arange(n)
    if act_order:
        for j in range(n // g):
            scales[:, j], zeros[:, j] = _grid(W[:, j * g:(j + 1) * g], bits, symmetric)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(out, n)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = perm[i1 + i].item()
            group = column // g
            if not act_order and column % g == 0:
                # The group's grid from the weights as corrected so far (at a block start the rest
                # of W is up to date too).
                span = torch.cat((W1[:, i:i + g], W[:, i2:i1 + i + g]), dim=1)
                scales[:, group], zeros[:, group] = _grid(span, bits, symmetric)
            q = _codes(W1[:, i:i + 1], scales[:, group], zeros[:, group], bits)[:, 0]
            codes[:, column] = q
            dequantized = (q - zeros[:, group]) * scales[:, group] if bits < 8 else q * scales[:, group]
            err = (W1[:, i] - dequantized) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            errors[:, i] = err
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return codes, scales, zeros


# ---- whole models ------------------------------------------------------------------------------

_LINEARS = (ColumnParallelLinear, RowParallelLinear, nn.Linear)


def _linears(module: nn.Module):
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _LINEARS)]


def _swap(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of root's submodule `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _replace(root: nn.Module, name: str, linear: nn.Module, bits: int, group_size: int, codes, scales, zeros):
    weight = linear.weight
    q = QuantizedLinear(weight.shape[1], weight.shape[0], bits, group_size, linear.bias is not None,
                        device=weight.device)
    q.set_codes(codes.to(weight.device), scales.to(weight.device), zeros.to(weight.device) if bits == 4 else None)
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.detach().float())
    _swap(root, name, q)


def _grouped_experts(module: nn.Module):
    from megalm.model.moe import GroupedExperts
    return [(name, m) for name, m in module.named_modules() if isinstance(m, GroupedExperts)]


def _replace_experts(root: nn.Module, name: str, experts: nn.Module, bits: int, group_size: int, quantized: list):
    """Swap `experts` for a QuantizedExperts holding `quantized` = [(codes, scales, zeros) of fc1, of fc2],
    each [E x rows, ...]."""
    e, two_ffn, hidden = experts.weight1.shape
    dev = experts.weight1.device
    q = QuantizedExperts(e, hidden, two_ffn // 2, bits, group_size, device=dev)
    for store, (codes, scales, zeros) in zip((q.fc1, q.fc2), quantized):
        store.set_codes(codes.to(dev), scales.to(dev), zeros.to(dev) if bits == 4 else None)
    _swap(root, name, q)


def _rtn_experts(experts: nn.Module, bits: int, group_size: int, symmetric: bool) -> list:
    """Round every expert's rows to nearest: rows are independent, so the experts stack as rows."""
    return [quantize_rtn(w.detach().reshape(-1, w.shape[-1]), bits, group_size, symmetric)
            for w in (experts.weight1, experts.weight2)]


def _bits(method: str) -> int:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return 8 if method == "int8" else 4


class _Stop(Exception):
    pass


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, calibration: Optional[Iterable[Tensor]] = None,
                   group_size: int = 128, symmetric: bool = False, act_order: bool = False,
                   damp: float = 0.01, block_size: int = 128) -> nn.Module:
    """Replace the linears of `model.layers` by `QuantizedLinear`s (and an MoE layer's routed experts by
    `QuantizedExperts`), in place; returns the model.

    gptq-int4 needs `calibration`: token batches [b, s] run through the model.
    """
    bits = _bits(method)
    model.eval()
    if method != "gptq-int4":
        for layer in model.layers:
            for name, linear in _linears(layer):
                _replace(layer, name, linear, bits, group_size,
                         *quantize_rtn(linear.weight.detach(), bits, group_size, symmetric))
            for name, experts in _grouped_experts(layer):
                _replace_experts(layer, name, experts, bits, group_size,
                                 _rtn_experts(experts, bits, group_size, symmetric))
        return model
    if calibration is None:
        raise ValueError("gptq-int4 needs calibration token batches")

    # The inputs of the first layer, for every calibration batch (the forward stops there).
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for tokens in calibration:
            try:
                model.hidden_states(tokens.to(next(model.parameters()).device))
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("gptq-int4 needs at least one calibration batch")

    for layer in model.layers:
        linears = _linears(layer)
        hessians = {name: torch.zeros(m.weight.shape[1], m.weight.shape[1], device=m.weight.device)
                    for name, m in linears}

        def accumulate(name):
            def hook(module, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # [tokens, in]
                hessians[name] += 2.0 * x.t() @ x
            return hook

        handles = [m.register_forward_hook(accumulate(name)) for name, m in linears]
        # Per expert: the Hessian of its fc1 inputs (the rows routed to it) and of its fc2 inputs.
        expert_hessians = {}

        def accumulate_experts(name):
            def hook(module, inputs, output):
                from megalm.kernels import swiglu
                x, counts = inputs[0].float(), inputs[1].tolist()
                h1, h2 = expert_hessians.setdefault(name, (
                    torch.zeros(len(counts), x.shape[1], x.shape[1], device=x.device),
                    torch.zeros(len(counts), module.weight2.shape[2], module.weight2.shape[2], device=x.device)))
                for e, rows in enumerate(torch.split(x, counts)):
                    if rows.shape[0]:
                        inner = swiglu(rows @ module.weight1[e].float().t())
                        h1[e] += 2.0 * rows.t() @ rows
                        h2[e] += 2.0 * inner.t() @ inner
            return hook

        experts_list = _grouped_experts(layer)
        handles += [m.register_forward_hook(accumulate_experts(name)) for name, m in experts_list]
        for args, kwargs in captured:
            layer(*args, **kwargs)
        for h in handles:
            h.remove()
        for name, linear in linears:
            codes, scales, zeros = quantize_gptq(linear.weight.detach().cpu(), hessians[name].cpu(), bits,
                                                 group_size, symmetric, act_order, block_size, damp)
            _replace(layer, name, linear, bits, group_size, codes, scales, zeros)
        for name, experts in experts_list:
            quantized = []
            for w, hs in zip((experts.weight1, experts.weight2), expert_hessians.get(name, (None, None))):
                per_expert = []
                for e in range(w.shape[0]):
                    if hs is None or not hs[e].diagonal().any():  # no calibration row reached it
                        per_expert.append(quantize_rtn(w[e].detach().cpu(), bits, group_size, symmetric))
                    else:
                        per_expert.append(quantize_gptq(w[e].detach().cpu(), hs[e].cpu(), bits, group_size,
                                                        symmetric, act_order, block_size, damp))
                quantized.append(tuple(torch.cat(parts) for parts in zip(*per_expert)))
            _replace_experts(layer, name, experts, bits, group_size, quantized)
        captured = [((layer(*args, **kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in captured]
    return model


def prepare_quantized(model: nn.Module, method: str, group_size: int) -> nn.Module:
    """Give a freshly built `model` the modules `quantize_model(model, method, group_size=...)` would
    give it, holding no codes yet: the shape a saved quantized state dict loads into. In place."""
    bits = _bits(method)
    for layer in model.layers:
        for name, linear in _linears(layer):
            _swap(layer, name, QuantizedLinear(linear.weight.shape[1], linear.weight.shape[0], bits, group_size,
                                               linear.bias is not None))
        for name, experts in _grouped_experts(layer):
            e, two_ffn, hidden = experts.weight1.shape
            _swap(layer, name, QuantizedExperts(e, hidden, two_ffn // 2, bits, group_size))
    return model


def model_bytes(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Bytes of every parameter and persistent buffer (optionally without embedding / output layer)."""
    total = 0
    for name, t in model.state_dict().items():
        if exclude_embeddings and name.split(".")[0] in ("embedding", "position_embeddings", "output_layer"):
            continue
        total += t.numel() * t.element_size()
    return total
