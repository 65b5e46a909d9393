"""Knowledge distillation: the losses between a student's and a teacher's next-token distributions,
and the teacher itself.

The divergence is the generalized Jensen-Shannon divergence of Agarwal et al. 2024 (GKD), as TRL's
`GKDTrainer.generalized_jsd_loss` defines it: with S and T the student's and teacher's softmax at
temperature tau, and the mixture M = (1 - beta) S + beta T,

    JSD_beta(S, T) = beta KL(T || M) + (1 - beta) KL(S || M),

except that beta = 0 is the forward KL(T || S) and beta = 1 the reverse KL(S || T) (the limits of
the formula itself are 0). It is summed over the vocabulary and averaged over the tokens whose label
is not -100, and not multiplied by tau^2. `--kd-loss forward_kl|reverse_kl` are beta 0 and 1;
`--kd-loss jsd` takes `--kd-beta`. The training loss is (1 - ratio) CE + ratio KD (`--kd-ratio`).

A teacher too big to run beside the student can be run once ahead of time
(tools/cache_teacher_logits.py): then only its top-k log-probabilities per position are kept, and
the loss is the same divergence between the two distributions restricted to those k tokens and
renormalised there (with k equal to the vocabulary it is the full loss).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megalm.config import Config, PostTrainConfig

IGNORE_INDEX = -100

# --kd-loss -> the beta of the generalized JSD (None: --kd-beta).
KD_BETAS = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}


def _divergence(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """Per-position generalized JSD [n] between two log-distributions [n, k] (see the module doc)."""
    if beta == 0.0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if beta == 1.0:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    mixture = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    kl_teacher = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
    kl_student = (student_logp.exp() * (student_logp - mixture)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _positions(labels: Optional[Tensor], n: int, device) -> Tensor:
    if labels is None:
        return torch.arange(n, device=device)
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                    beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 4096) -> Tensor:
    """Mean generalized JSD over the positions whose label is not -100 (all without labels).

    Logits are [..., V] (the teacher's may be wider: a padded vocabulary, cut to the student's).
    Computed in fp32, `chunk_size` positions at a time, so the temporaries stay at a few [chunk, V]."""
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :vocab]
    keep = _positions(labels, student.shape[0], student.device)
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, keep.numel(), chunk_size):
        rows = keep[start:start + chunk_size]
        s = F.log_softmax(student[rows].float() / temperature, dim=-1)
        t = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
        total = total + _divergence(s, t, beta).sum()
    return total / max(keep.numel(), 1)


def topk_generalized_jsd(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor,
                         labels: Optional[Tensor] = None, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """The generalized JSD against a cached teacher: its top-k log-probabilities [..., k] at
    temperature 1 and their token ids [..., k]. Both distributions are restricted to those k tokens
    and renormalised there; the teacher's are rescaled to `temperature` first."""
    vocab = student_logits.shape[-1]
    k = teacher_indices.shape[-1]
    student = student_logits.reshape(-1, vocab)
    keep = _positions(labels, student.shape[0], student.device)
    index = teacher_indices.reshape(-1, k)[keep].long()
    if index.numel() and int(index.max()) >= vocab:
        raise ValueError(f"the cached teacher logits name token {int(index.max())}, beyond the student's "
                         f"vocabulary of {vocab}: they were computed with another tokenizer")
    s = F.log_softmax(student[keep].float().gather(1, index) / temperature, dim=-1)
    t = F.log_softmax(teacher_logprobs.reshape(-1, k)[keep].float() / temperature, dim=-1)
    return _divergence(s, t, beta).sum() / max(keep.numel(), 1)


def kd_beta(config: PostTrainConfig) -> float:
    beta = KD_BETAS[config.kd_loss]
    return config.kd_beta if beta is None else beta


def load_teacher(path: str, student: Config, device: torch.device, dtype: torch.dtype):
    """The teacher of `--teacher-load`: a megalm checkpoint of any layout (merged to one piece), in
    eval mode on `device`, with no gradients. Its tokenizer must be the student's: the vocabularies
    (without padding) must agree."""
    from megalm.checkpoint.merge import checkpoint_config, open_checkpoint
    from megalm.model import GPTModel
    found = open_checkpoint(path)
    config = checkpoint_config(found)
    if config.model.vocab_size and student.model.vocab_size and config.model.vocab_size != student.model.vocab_size:
        raise ValueError(f"the teacher in {path} has a vocabulary of {config.model.vocab_size} tokens, the student "
                         f"{student.model.vocab_size}: distillation needs the same tokenizer (convert the teacher "
                         f"with the student's tokenizer, or the student with the teacher's)")
    config.model.attention_dropout = config.model.hidden_dropout = 0.0
    teacher = GPTModel(config.model)
    teacher.load_state_dict(found["model"])
    teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return teacher
