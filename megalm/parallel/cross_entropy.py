"""Cross-entropy over a vocabulary split across tensor-parallel ranks (Megatron-LM's math).

Each rank holds the logits of its vocabulary slice, [n, V / TP]. The loss of token i is

    loss_i = log(sum_v exp(z_iv - m_i)) - (z_i,label - m_i),     m_i = max_v z_iv

and every term is a sum or a max over the vocabulary, so it needs only the all-reduce of three
numbers per token: the max (MAX), then the sum of exponentials and the target logit (SUM; the
rank that owns the label contributes it, the others 0). The gradient with respect to the local
logits is local: softmax - one_hot(label), restricted to the slice. The full [n, V] logits never
exist on any rank.

`vocab_parallel_linear_cross_entropy` also fuses the output layer: tokens go through in chunks, the
[chunk, V / TP] logits of one chunk at a time, and the gradients with respect to the hidden states
and the weight shard are accumulated during the forward pass (the backward only scales them). Its
hidden-state gradient is this rank's partial sum over its vocabulary slice: the caller feeds the
hidden states through `copy_to_tensor_parallel_region` (or the sequence-parallel all-gather), whose
backward completes the sum. A reference implementation in PyTorch: correct everywhere, fast enough
that the logits' memory, not time, is what it saves.

Both return the mean over the tokens whose label is not `ignore_index` (0 when all are ignored);
`vocab_parallel_token_cross_entropy` returns each token's loss (0 where ignored), whose negation is
the label's log-probability (`megalm.posttrain.logprobs`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 4096


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                   ignore_index: int, count: torch.Tensor):
    """logits [n, V/TP] (any float dtype) -> (each token's loss [n], 0 where ignored; d(sum/count)/d(logits)
    in fp32)."""
    logits = logits.float()
    n, local_vocab = logits.shape
    valid = labels != ignore_index
    local = labels - vocab_start
    owned = valid & (local >= 0) & (local < local_vocab)
    index = torch.where(owned, local, 0)
    row_max = logits.max(dim=-1).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - row_max.unsqueeze(-1)  # [n, V/TP]
    exp = shifted.exp()
    target = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1) * owned
    stats = torch.stack([exp.sum(dim=-1), target])  # [2, n]
    dist.all_reduce(stats, group=group)
    sum_exp, target = stats[0], stats[1]
    loss = torch.where(valid, sum_exp.log() - target, 0.0)
    grad = exp.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, this rank's slice
    grad[torch.arange(n, device=grad.device), index] -= owned.float()
    grad.mul_((valid.float() / count).unsqueeze(-1))
    return loss, grad


def _count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).sum().clamp(min=1).float()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, ignore_index):
        count = _count(labels, ignore_index)
        loss, grad = _loss_and_grad(logits, labels, vocab_start, group, ignore_index, count)
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return loss.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean loss of logits [n, V / TP] (this rank's slice, starting at `vocab_start`) and labels [n]."""
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, group, ignore_index)


class _VocabParallelTokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, ignore_index):
        count = torch.ones((), device=logits.device)  # each token's own loss: no mean
        loss, grad = _loss_and_grad(logits, labels, vocab_start, group, ignore_index, count)
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None, None, None


def vocab_parallel_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                                       ignore_index: int = -100) -> torch.Tensor:
    """Each token's loss [n] (0 where the label is `ignore_index`) of logits [n, V / TP] and labels [n]."""
    return _VocabParallelTokenCrossEntropy.apply(logits, labels, vocab_start, group, ignore_index)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, ignore_index, chunk_tokens):
        # The matmuls run in the dtype the unfused layer would use (autocast's, when it is on).
        dtype = torch.get_autocast_dtype(hidden.device.type) \
            if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        count = _count(labels, ignore_index)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            logits = F.linear(h[start:end], w)  # [chunk, V/TP]
            loss, grad = _loss_and_grad(logits, labels[start:end], vocab_start, group, ignore_index, count)
            total += loss.sum()
            grad = grad.to(dtype)
            grad_hidden[start:end] = grad @ w
            grad_weight += (grad.t() @ h[start:end]).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return ((grad_hidden * grad_loss).to(ctx.dtypes[0]), (grad_weight * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                        vocab_start: int, group, ignore_index: int = -100,
                                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean loss of hidden [n, h] against this rank's output weight slice [V / TP, h]."""
    return _VocabParallelLinearCrossEntropy.apply(hidden, weight, labels, vocab_start, group, ignore_index,
                                                  chunk_tokens)
