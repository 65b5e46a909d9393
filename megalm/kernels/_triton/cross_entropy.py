"""Triton cross-entropy (+ z-loss) over rows of logits, writing d(loss)/d(logits) as it goes, and
the chunked linear + cross-entropy built on it.

One program per row, two passes over the vocabulary: an online max / sum gives
lse = logsumexp(x); then, with p = softmax(x), the gradient of
``lse - x[label] + z * lse ** 2`` is ``p * (1 + 2 z lse) - onehot(label)``, times the reduction
scale (1 / valid tokens for ``mean``, read from device memory so that no host sync is needed).
The gradient may overwrite the logits in place (DX == X): each block is read before it is written.
Rows whose label is ``ignore_index`` get zero loss and zero gradient; any other label outside
[0, V) gives a NaN loss (never a read outside the row).
"""

import torch
import triton
import triton.language as tl

from megalm.kernels._triton import next_power_of_2, triton_interpreting


@triton.jit
def _cross_entropy_kernel(X, DX, Labels, Loss, Scale, stride_x, stride_dx, V, ignore_index, z_loss_coeff,
                          COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    label = tl.load(Labels + row).to(tl.int64)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    m = float("-inf")
    total = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    # a label outside [0, V) that is not ignore_index gives a NaN loss rather than a stray read
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(x_row + target, mask=in_range, other=float("nan")).to(tl.float32)
    loss = lse - x_target + z_loss_coeff * lse * lse
    tl.store(Loss + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(Scale), 0.0)
        softmax_coeff = 1.0 + 2.0 * z_loss_coeff * lse
        dx_row = DX + row * stride_dx
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * softmax_coeff - tl.where(cols == target, 1.0, 0.0)
            tl.store(dx_row + cols, (grad * scale).to(DX.dtype.element_ty), mask=cols < V)


def _launch(logits, grad, labels, loss_rows, scale, ignore_index, z_loss_coeff, compute_grad):
    rows, vocab = logits.shape
    block = min(next_power_of_2(vocab), 1024 if triton_interpreting() else 4096)
    _cross_entropy_kernel[(rows,)](
        logits, grad, labels, loss_rows, scale, logits.stride(0), grad.stride(0), vocab, ignore_index,
        z_loss_coeff, COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4)


def _reduction_scale(labels, ignore_index, reduction):
    """[1] fp32 on the device: 1 / (valid tokens) for mean (1 if none), 1 for sum."""
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=labels.device)
    count = (labels != ignore_index).sum().clamp(min=1)
    return count.to(torch.float32).reciprocal().reshape(1)


def cross_entropy_forward(logits, labels, ignore_index, z_loss_coeff, reduction, compute_grad):
    """logits [n, V] -> (loss [] fp32, dlogits [n, V] in logits' dtype or empty)."""
    scale = _reduction_scale(labels, ignore_index, reduction)
    loss_rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else logits
    _launch(logits, grad, labels, loss_rows, scale, ignore_index, z_loss_coeff, compute_grad)
    loss = loss_rows.sum() * scale[0]
    return loss, grad if compute_grad else logits.new_empty(0)


def chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so that a logits chunk is about as large as the hidden states
    (tokens x hidden), rounded to a power of two for matmul-friendly shapes."""
    return max(1, min(tokens, next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, hidden)))))


def linear_cross_entropy_forward(hidden, weight, labels, ignore_index, z_loss_coeff, reduction,
                                 grad_hidden, grad_weight):
    """hidden [n, h], weight [V, h] -> (loss [] fp32, d hidden [n, h] or empty, d weight [V, h] fp32 or empty)."""
    tokens, width = hidden.shape
    vocab = weight.shape[0]
    w = weight.to(hidden.dtype)
    scale = _reduction_scale(labels, ignore_index, reduction)
    loss_rows = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    d_weight = torch.zeros(vocab, width, dtype=torch.float32, device=hidden.device) if grad_weight \
        else weight.new_empty(0)
    step = chunk_size(tokens, width, vocab)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, tokens, step):
            end = min(start + step, tokens)
            chunk = hidden[start:end]                      # [c, h]
            logits = chunk @ w.t()                         # [c, V], overwritten by d loss / d logits
            _launch(logits, logits, labels[start:end], loss_rows[start:end], scale, ignore_index,
                    z_loss_coeff, grad_hidden or grad_weight)
            if grad_hidden:
                torch.mm(logits, w, out=d_hidden[start:end])
            if grad_weight:
                if logits.dtype == torch.float32:
                    d_weight.addmm_(logits.t(), chunk)
                else:  # product in the activation dtype, sum over chunks in fp32
                    d_weight.add_(logits.t() @ chunk)
    return loss_rows.sum() * scale[0], d_hidden, d_weight
