"""Cross-entropy loss with optional z-loss, unfused and fused with the output layer.

For each token whose label is not ``ignore_index``::

    lse  = logsumexp(logits)                      (fp32)
    loss = lse - logits[label] + z_loss_coeff * lse ** 2

reduced by ``mean`` (over the non-ignored tokens; 0 when every token is ignored) or ``sum``.

`linear_cross_entropy(hidden [n, h], weight [V, h], labels [n])` computes the logits
``hidden @ weight.T`` itself. Its fast path never holds the [n, V] logits: tokens go through in
chunks; for each chunk a torch matmul produces the logits, a Triton kernel computes the loss and
overwrites that logits chunk in place with d(loss)/d(logits), and the chunk's contribution to the
hidden and weight gradients is taken at once (the weight gradient accumulates in fp32). The
gradients are therefore computed during the forward pass and only scaled by the incoming gradient
in the backward pass. The logits matmuls run in the hidden states' dtype (the weight is cast to
it), or in the autocast dtype when autocast is on, as the unfused matmul would.
"""

from typing import Optional

import torch
from torch import Tensor

from megalm.kernels import dispatch

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction={reduction!r}; expected one of {', '.join(REDUCTIONS)}")


def cross_entropy_reference(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                            z_loss_coeff: float = 0.0, reduction: str = "mean") -> Tensor:
    logits = logits.float()
    valid = labels != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, lse - target + z_loss_coeff * lse * lse, 0.0).sum()
    if reduction == "mean":
        loss = loss / valid.sum().clamp(min=1)
    return loss


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                   z_loss_coeff: float = 0.0, reduction: str = "mean") -> Tensor:
    logits = hidden.float() @ weight.float().t()  # [n, V] fp32
    return cross_entropy_reference(logits, labels, ignore_index, z_loss_coeff, reduction)


# ---- unfused: logits given ----------------------------------------------------------------

@torch.library.custom_op("megalm::cross_entropy_forward", mutates_args=())
def _cross_entropy_forward(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coeff: float,
                           reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """-> (loss [] fp32, d(loss)/d(logits) [n, V] in logits' dtype, empty without compute_grad)."""
    from megalm.kernels._triton.cross_entropy import cross_entropy_forward
    return cross_entropy_forward(logits, labels, ignore_index, z_loss_coeff, reduction, compute_grad)


@_cross_entropy_forward.register_fake
def _(logits, labels, ignore_index, z_loss_coeff, reduction, compute_grad):
    return logits.new_empty((), dtype=torch.float32), \
        torch.empty_like(logits) if compute_grad else logits.new_empty(0)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, z_loss_coeff, reduction):
        loss, dlogits = _cross_entropy_forward(logits, labels, ignore_index, z_loss_coeff, reduction,
                                               logits.requires_grad)
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (dlogits,) = ctx.saved_tensors
        return dlogits * grad_loss.to(dlogits.dtype), None, None, None, None


# ---- fused: hidden states and output weight given -------------------------------------------

@torch.library.custom_op("megalm::linear_cross_entropy_forward", mutates_args=())
def _linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                                  z_loss_coeff: float, reduction: str, grad_hidden: bool,
                                  grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss [] fp32, d loss/d hidden [n, h] (hidden dtype), d loss/d weight [V, h] fp32); a
    gradient not asked for comes back empty."""
    from megalm.kernels._triton.cross_entropy import linear_cross_entropy_forward
    return linear_cross_entropy_forward(hidden, weight, labels, ignore_index, z_loss_coeff, reduction,
                                        grad_hidden, grad_weight)


@_linear_cross_entropy_forward.register_fake
def _(hidden, weight, labels, ignore_index, z_loss_coeff, reduction, grad_hidden, grad_weight):
    return (hidden.new_empty((), dtype=torch.float32),
            torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=torch.float32) if grad_weight else weight.new_empty(0))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, z_loss_coeff, reduction):
        loss, d_hidden, d_weight = _linear_cross_entropy_forward(
            hidden, weight, labels, ignore_index, z_loss_coeff, reduction,
            hidden.requires_grad, weight.requires_grad)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        grad_hidden = d_hidden * grad_loss.to(d_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (d_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def _unsupported(tensors: tuple[Tensor, ...], labels: Tensor, rows: int):
    def check(name: str) -> Optional[str]:
        reason = dispatch.triton_unsupported_device(*tensors, labels)
        if reason is not None:
            return reason
        if any(t.dtype not in dispatch.FLOAT_DTYPES for t in tensors):
            return f"unsupported dtypes {[t.dtype for t in tensors]}"
        if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (rows,):
            return f"labels must be int64 [{rows}], got {labels.dtype} {tuple(labels.shape)}"
        return None
    return check


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, z_loss_coeff: float = 0.0,
                  reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Loss of logits [n, V] against labels [n] (see the module docstring); backend auto|triton|reference."""
    _check_reduction(reduction)
    ok = logits.dim() == 2 and logits.shape[0] > 0
    check = _unsupported((logits,), labels, logits.shape[0]) if ok else (lambda name: "logits must be [n, V], n > 0")
    impl = dispatch.select("cross_entropy", backend, logits.device, ("triton",), check)
    if impl == "reference":
        return cross_entropy_reference(logits, labels, ignore_index, z_loss_coeff, reduction)
    return CrossEntropyFunction.apply(logits.contiguous(), labels.contiguous(), ignore_index,
                                      float(z_loss_coeff), reduction)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                         z_loss_coeff: float = 0.0, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Loss of logits = hidden [n, h] @ weight[V, h].T against labels [n], without materialising the
    logits on the fast path; backend auto|triton|reference."""
    _check_reduction(reduction)
    if torch.is_autocast_enabled(hidden.device.type):
        # the fast path's custom op is opaque to autocast: run its matmuls in the autocast dtype, as
        # the unfused logits matmul would be (the cast is differentiable: the gradient returns in fp32)
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    ok = hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1] and hidden.shape[0] > 0
    check = _unsupported((hidden, weight), labels, hidden.shape[0]) if ok else \
        (lambda name: f"expected hidden [n, h], weight [V, h]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    impl = dispatch.select("linear_cross_entropy", backend, hidden.device, ("triton",), check)
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, z_loss_coeff, reduction)
    return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                                            ignore_index, float(z_loss_coeff), reduction)
