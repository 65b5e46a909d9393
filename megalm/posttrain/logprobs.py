"""Per-token log-probabilities of given labels, the quantities preference and RL losses are made of.

    log p(label_t | x_<=t) = -CE_t = z_t,label / T - logsumexp_v(z_t,v / T)

Under tensor parallelism each rank holds only its vocabulary slice of the logits [b, s, V / TP];
the log-probability is the negated per-token vocab-parallel cross-entropy
(`megalm.parallel.cross_entropy`: three numbers per token all-reduced, the gradient local), so the
full [b, s, V] logits never exist on any rank. The padding rows of a padded vocabulary (ids at or
beyond the tokenizer's `vocab_size`) are no token: they are left out of the softmax, as a Hugging
Face export of the model and megalm's generation leave them out.

Labels of -100 (prompt, padding) get log-probability 0 and no gradient. A packed row holds several
documents (`document_ids`, as the SFT and preference datasets lay them out); `document_sums` adds a
per-token quantity up per document, and `document_logprobs` gives each document's summed or mean
log-probability over its labelled tokens (DPO's sequence log-probability, SimPO's mean).

    logits, vocab_start, group = vocab_logits(model, tokens, position_ids, document_ids)
    logps = token_logprobs(logits, labels, vocab_start, group)                        # [b, s]
    per_doc = document_logprobs(logps, labels, document_ids, num_documents=2)         # [b, 2]
    entropy = token_entropy(logits, group)                                            # [b, s], no grad
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megalm.parallel import mappings
from megalm.parallel.cross_entropy import vocab_parallel_token_cross_entropy
from megalm.parallel.tensor import vocab_parallel_logits

IGNORE_INDEX = -100


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside the trainer's wrappers (DistributedDataParallel, torch.compile)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def vocab_logits(model: torch.nn.Module, tokens: Tensor, position_ids: Optional[Tensor] = None,
                 document_ids: Optional[Tensor] = None) -> tuple[Tensor, int, Optional[object]]:
    """(this rank's logits [b, s, V / TP] with the padded vocabulary's rows at -inf, the id of its
    first column, the tensor-parallel group or None). Without tensor parallelism: the whole
    vocabulary, 0, None. The model must hold the output layer (the last pipeline stage)."""
    gpt = unwrap(model)
    h = gpt.hidden_states(tokens, position_ids=position_ids, document_ids=document_ids)
    p = gpt.parallel
    group, vocab_start = None, 0
    weight = gpt.output_weight
    if p.tensor_model_parallel_size > 1:
        group = p.tensor_model_parallel_group
        # As GPTModel's own output layer: the hidden states' gradient is this rank's partial sum.
        h = (mappings.gather_from_sequence_parallel_region(h, group) if p.sequence_parallel
             else mappings.copy_to_tensor_parallel_region(h, group))
        vocab_start = p.tensor_model_parallel_rank * weight.shape[0]
    logits = vocab_parallel_logits(h, weight)
    return mask_padded_vocab(logits, vocab_start, gpt.config.vocab_size), vocab_start, group


def mask_padded_vocab(logits: Tensor, vocab_start: int, vocab_size: Optional[int]) -> Tensor:
    """The logits with the columns of ids >= vocab_size (the padding of the vocabulary) at -inf."""
    local = logits.shape[-1]
    if not vocab_size or vocab_start + local <= vocab_size:
        return logits
    padding = torch.arange(vocab_start, vocab_start + local, device=logits.device) >= vocab_size
    return logits.masked_fill(padding, float("-inf"))


def token_logprobs(logits: Tensor, labels: Tensor, vocab_start: int = 0, group=None,
                   temperature: float = 1.0) -> Tensor:
    """log p(label) of every position [..] in fp32 from logits [.., V] (or this rank's slice
    [.., V / TP] starting at `vocab_start`, with the tensor-parallel `group`) at `temperature`;
    0, with no gradient, where the label is -100. Differentiable."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if temperature != 1.0:
        flat = flat / temperature
    labels_flat = labels.reshape(-1)
    if group is None or dist.get_world_size(group) == 1:
        ce = F.cross_entropy(flat, labels_flat, ignore_index=IGNORE_INDEX, reduction="none")
    else:
        ce = vocab_parallel_token_cross_entropy(flat, labels_flat, vocab_start, group, IGNORE_INDEX)
    return -ce.reshape(labels.shape)


@torch.no_grad()
def token_entropy(logits: Tensor, group=None, temperature: float = 1.0) -> Tensor:
    """The entropy [..] of the next-token distribution at every position, in fp32 and without
    gradient (a quantity to log): log Z - sum_v p_v z_v over the whole vocabulary, from the local
    slices under tensor parallelism (all-reduced: the max, Z and sum_v e^z_v z_v per position)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    parallel = group is not None and dist.get_world_size(group) > 1
    top = z.max(dim=-1, keepdim=True).values
    if parallel:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = z - top
    e = shifted.exp()
    # exp(-inf) * -inf is nan: the masked padding contributes nothing.
    stats = torch.stack([e.sum(-1), torch.where(e > 0, e * shifted, 0.0).sum(-1)])
    if parallel:
        dist.all_reduce(stats, group=group)
    return stats[0].log() - stats[1] / stats[0]


def document_sums(values: Tensor, document_ids: Tensor, num_documents: int) -> Tensor:
    """Per-document sums [b, num_documents] of per-token values [b, s] over a packed row's
    documents (ids 0, 1, ...; positions with an id >= num_documents, the padding, are left out).
    Differentiable in `values`."""
    b, s = values.shape
    index = document_ids.clamp(max=s - 1)
    sums = values.new_zeros(b, s).scatter_add(1, index, torch.where(document_ids < num_documents, values, 0.0))
    return sums[:, :num_documents]


def document_logprobs(logps: Tensor, labels: Tensor, document_ids: Tensor, num_documents: int,
                      average: bool = False) -> Tensor:
    """Each document's log-probability [b, num_documents]: the sum of `token_logprobs` over its
    labelled tokens, or with `average` their mean (0 for a document without one)."""
    total = document_sums(logps, document_ids, num_documents)
    if not average:
        return total
    count = document_sums((labels != IGNORE_INDEX).to(logps.dtype), document_ids, num_documents)
    return total / count.clamp(min=1)
