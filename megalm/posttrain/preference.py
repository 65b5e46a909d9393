"""Learning from preference pairs: DPO and its family, and reward models (Bradley-Terry).

A batch row holds one pair (`megalm.data.preference_dataset`): the chosen sample is document 0, the
rejected one document 1, so one forward pass gives both.

DPO (Rafailov et al. 2023) and its variants, as TRL computes them. With the sequence
log-probabilities summed over the completion tokens (EOS included), policy pi and reference
pi_ref, the log-ratio of each side is h = log pi - log pi_ref and Delta = h_chosen - h_rejected:

    sigmoid  -log sigmoid(beta Delta)                                          (DPO)
    hinge    max(0, 1 - beta Delta)                                            (SLiC)
    ipo      (h_chosen / n_chosen - h_rejected / n_rejected - 1 / (2 beta))^2   (IPO; n: completion tokens)
    robust   (-(1 - e) log sigmoid(beta Delta) + e log sigmoid(-beta Delta)) / (1 - 2e)    (rDPO)
    cdpo     -(1 - e) log sigmoid(beta Delta) - e log sigmoid(-beta Delta)     (conservative DPO)
    simpo    the cdpo form on x = mean log pi_chosen - mean log pi_rejected - gamma / beta, without
             a reference (SimPO: length-normalised, target margin gamma; TRL's CPOTrainer)

(e: --label-smoothing, gamma: --simpo-gamma). The loss is the mean over pairs. The implicit rewards
logged are beta h (SimPO: beta times the mean log-probability); accuracy is the fraction of pairs
whose chosen reward is the higher, the margin their mean difference.

Reward model: a scalar head `score` (Linear(h, 1, bias=False), the name Hugging Face's
*ForSequenceClassification models give it) on the final hidden state of each sequence's last
token; the loss is Bradley-Terry's -log sigmoid(r_chosen - r_rejected - margin), plus
c mean((r_chosen + r_rejected)^2) with --center-rewards-coefficient c (TRL's RewardTrainer).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megalm.config import Config
from megalm.model.moe import moe_aux_loss
from megalm.parallel import mappings
from megalm.posttrain.heads import add_score_head  # noqa: F401  (part of this module's API)
from megalm.posttrain.logprobs import IGNORE_INDEX, document_logprobs, document_sums, token_logprobs, unwrap, vocab_logits
from megalm.posttrain.reference import ReferencePolicy
from megalm.training.trainer import model_inputs

DEFAULT_BETA = 0.1
PAD_MULTIPLE = 64  # rows are cut to a multiple of this (times the tensor-parallel size), not shorter


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Optional[Tensor],
             ref_rejected_logps: Optional[Tensor], loss_type: str = "sigmoid", beta: float = DEFAULT_BETA,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, chosen_tokens: Optional[Tensor] = None,
             rejected_tokens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses [b], chosen rewards [b], rejected rewards [b]) of the module docstring's
    formulas. The log-probabilities are summed over the completion tokens, except for simpo, which
    takes their means (and no reference). ipo needs the completion token counts."""
    if loss_type == "simpo":
        x = chosen_logps - rejected_logps - simpo_gamma / beta
        return (_smoothed_sigmoid_loss(beta * x, label_smoothing), beta * chosen_logps.detach(),
                beta * rejected_logps.detach())
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    elif loss_type == "cdpo":
        losses = _smoothed_sigmoid_loss(beta * delta, label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Optional[Tensor] = None,
                       center_coefficient: Optional[float] = None) -> Tensor:
    """Mean -log sigmoid(r_c - r_r - margin) (+ c mean((r_c + r_r)^2))."""
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


class PairMetrics:
    """Sums of the logged pair statistics since they were last read, per split (train / eval)."""

    NAMES = ("rewards/chosen", "rewards/rejected", "margins", "accuracy")

    def __init__(self):
        self.sums: dict = {}

    def add(self, split: str, chosen: Tensor, rejected: Tensor) -> None:
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        values = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                              (chosen > rejected).float().sum(), torch.tensor(float(chosen.numel()),
                                                                             device=chosen.device)])
        self.sums[split] = values if split not in self.sums else self.sums[split] + values

    def read(self, split: str, group=None) -> dict:
        """{name: mean over the pairs since the last read}, summed over `group`'s ranks (data
        parallel); every rank of the group must call it."""
        values = self.sums.pop(split, None)
        if values is None:
            return {}
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
        count = max(values[-1].item(), 1.0)
        return {name: v / count for name, v in zip(self.NAMES, values[:-1].tolist())}


def pair_inputs(batch: dict, model: nn.Module) -> dict:
    """The model inputs of a micro-batch of pair rows, cut after the last position any row's pair
    fills (rounded up to PAD_MULTIPLE x TP, as sequence parallelism splits the sequence): the padding
    behind it is attended by nothing before it, so cutting it changes no output, only the cost."""
    gpt = unwrap(model)
    inputs = model_inputs(batch, next(gpt.parameters()).device)
    multiple = PAD_MULTIPLE * gpt.parallel.tensor_model_parallel_size
    used = int((inputs["document_ids"] < 2).sum(1).max())
    length = min(inputs["tokens"].shape[1], -(-used // multiple) * multiple)
    return {key: value[:, :length] for key, value in inputs.items()}


def _split(model: nn.Module) -> str:
    return "train" if unwrap(model).training else "eval"


class DPOStep:
    """The trainer's forward step for --task dpo: the mean DPO loss of a micro-batch of pairs.
    The reference log-probabilities come with the batch (--precompute-ref-logps), from the
    reference policy (`megalm.posttrain.reference`), or are not needed (simpo)."""

    def __init__(self, config: Config, reference_path: Optional[str] = None):
        p = config.posttrain
        self.loss_type, self.label_smoothing, self.simpo_gamma = p.dpo_loss, p.label_smoothing, p.simpo_gamma
        self.beta = DEFAULT_BETA if p.beta is None else p.beta
        self.reference = ReferencePolicy(reference_path or p.ref_load or config.train.load)
        self.stats = PairMetrics()

    def sequence_logprobs(self, model: nn.Module, inputs: dict) -> tuple[Tensor, Tensor]:
        """(the policy's log-probabilities [b, 2] of chosen and rejected, their completion token
        counts [b, 2])."""
        logits, vocab_start, group = vocab_logits(model, inputs["tokens"], inputs["position_ids"],
                                                  inputs["document_ids"])
        labels, documents = inputs["labels"], inputs["document_ids"]
        logps = token_logprobs(logits, labels, vocab_start, group)
        counts = document_sums((labels != IGNORE_INDEX).float(), documents, 2)
        return document_logprobs(logps, labels, documents, 2, average=self.loss_type == "simpo"), counts

    def reference_logprobs(self, model: nn.Module, inputs: dict) -> Tensor:
        return document_logprobs(self.reference.token_logprobs(model, inputs), inputs["labels"],
                                 inputs["document_ids"], 2)

    def __call__(self, batch: dict, model: nn.Module) -> Tensor:
        inputs = pair_inputs(batch, model)
        logps, counts = self.sequence_logprobs(model, inputs)
        ref = None
        if self.loss_type != "simpo":
            ref = (batch["ref_logps"].to(logps.device) if "ref_logps" in batch
                   else self.reference_logprobs(model, inputs))
        losses, chosen, rejected = dpo_loss(
            logps[:, 0], logps[:, 1], None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
            self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma, counts[:, 0], counts[:, 1])
        self.stats.add(_split(model), chosen, rejected)
        loss = losses.mean()
        aux = moe_aux_loss(unwrap(model))
        return loss if aux is None else loss + aux

    def metrics(self, split: str, group=None) -> dict:
        return self.stats.read(split, group)


def last_token_index(document_ids: Tensor, num_documents: int = 2) -> Tensor:
    """The position [b, num_documents] of each document's last token in a packed row."""
    lengths = document_sums(torch.ones_like(document_ids, dtype=torch.float32), document_ids, num_documents)
    return lengths.long().cumsum(1) - 1


def sequence_rewards(model: nn.Module, tokens: Tensor, position_ids: Optional[Tensor] = None,
                     document_ids: Optional[Tensor] = None, num_documents: int = 1) -> Tensor:
    """The reward model's score [b, num_documents] of each document of the rows (without
    document ids: one sequence per row, read at its last token)."""
    gpt = unwrap(model)
    h = gpt.hidden_states(tokens, position_ids=position_ids, document_ids=document_ids)
    p = gpt.parallel
    if p.sequence_parallel:
        # Every rank scores the whole sequence: the gradient of its slice is already complete.
        h = mappings.gather_from_sequence_parallel_region(h, p.tensor_model_parallel_group,
                                                          tensor_parallel_output_grad=False)
    if document_ids is None:
        document_ids = torch.zeros_like(tokens)
    index = last_token_index(document_ids, num_documents)  # [b, D]
    last = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [b, D, h]
    return gpt.score(last).squeeze(-1).float()


class RewardStep:
    """The trainer's forward step for --task reward: the Bradley-Terry loss of a micro-batch of pairs."""

    def __init__(self, config: Config):
        self.center = config.posttrain.center_rewards_coefficient
        self.stats = PairMetrics()

    def __call__(self, batch: dict, model: nn.Module) -> Tensor:
        inputs = pair_inputs(batch, model)
        rewards = sequence_rewards(model, inputs["tokens"], inputs["position_ids"], inputs["document_ids"], 2)
        margin = batch["margin"].to(rewards.device).float() if "margin" in batch else None
        self.stats.add(_split(model), rewards[:, 0], rewards[:, 1])
        loss = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin, self.center)
        aux = moe_aux_loss(unwrap(model))
        return loss if aux is None else loss + aux

    def metrics(self, split: str, group=None) -> dict:
        return self.stats.read(split, group)


class WithReferenceLogprobs(torch.utils.data.Dataset):
    """A preference dataset whose items also carry ``ref_logps`` [2]: the reference policy's
    log-probabilities of the row's chosen and rejected completions, computed once."""

    def __init__(self, dataset, logps: Tensor):
        self.dataset, self.logps = dataset, logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        item["ref_logps"] = self.logps[int(self.dataset.order[i])]
        return item


@torch.no_grad()
def precompute_reference_logprobs(dataset, step: DPOStep, policy: nn.Module, config: Config) -> WithReferenceLogprobs:
    """`dataset` with the reference log-probabilities of every row (--precompute-ref-logps). The
    rows are shared out over the data-parallel ranks (each tensor-parallel group computes its
    share together) and the results summed over them, so every rank ends with all of them."""
    from megalm.data.loader import collate_tokens
    from megalm.training.precision import autocast, compute_dtype
    gpt = unwrap(policy)
    p, device = gpt.parallel, next(gpt.parameters()).device
    first_index = {}  # the rows the dataset yields (all, unless it is asked for fewer samples)
    for i, row in enumerate(dataset.order):
        first_index.setdefault(int(row), i)
    logps = torch.zeros(len(dataset.pairs), 2, device=device)
    mine = sorted(first_index)[p.data_parallel_rank::p.data_parallel_size]
    size = config.train.micro_batch_size
    for start in range(0, len(mine), size):
        chunk = mine[start:start + size]
        batch = collate_tokens([dataset[first_index[row]] for row in chunk])
        with autocast(device, compute_dtype(config.train)):
            logps[chunk] = step.reference_logprobs(policy, pair_inputs(batch, policy))
    if p.data_parallel_size > 1:
        dist.all_reduce(logps, group=p.data_parallel_group)
    return WithReferenceLogprobs(dataset, logps.cpu())
