"""The reference policy of DPO and GRPO: the model training started from, frozen.

Two ways to hold it, chosen by the policy itself:

- LoRA (`--lora-rank`): the policy with its adapters switched off (`lora.adapters_disabled`) is
  exactly the base model, so there is no second copy of the weights.
- otherwise: a frozen copy co-hosted beside the policy, loaded from the starting checkpoint (the
  run's base `--load`, also on resume) in the run's own tensor-parallel layout: each rank holds its
  shard, and log-probabilities come through the same vocab-parallel path as the policy's. It is
  built on first use, on the meta device and then filled, so it draws nothing from the random
  generators: a resumed run samples what the uninterrupted one does.

Both run in eval mode (no dropout) and without gradients.

    reference = ReferencePolicy(config.posttrain.ref_load)
    with reference.model(policy) as ref:                 # a GPTModel (or the policy, adapters off)
        logits = ref(tokens)
    logps = reference.token_logprobs(policy, inputs)     # [b, s], 0 where the label is -100
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from megalm.model import GPTModel
from megalm.posttrain.logprobs import token_logprobs, unwrap, vocab_logits


class ReferencePolicy:
    """The frozen starting policy. `path` is the checkpoint to load the co-hosted copy from (used
    only when the policy has no LoRA adapters)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.copy: Optional[nn.Module] = None

    @contextlib.contextmanager
    def model(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The reference as a module for the duration of the block: `policy` (any trainer wrapper)
        with its adapters disabled and in eval mode, or the co-hosted copy."""
        from megalm.posttrain.lora import adapted_linears, adapters_disabled
        gpt = unwrap(policy)
        if adapted_linears(gpt):
            training = gpt.training
            gpt.eval()
            try:
                with adapters_disabled(gpt), torch.no_grad():
                    yield gpt
            finally:
                gpt.train(training)
            return
        if self.copy is None:
            self.copy = load_reference(self.path, gpt)
        with torch.no_grad():
            yield self.copy

    def token_logprobs(self, policy: nn.Module, inputs: dict, temperature: float = 1.0) -> Tensor:
        """log p_ref(label) [b, s] of a micro-batch's model inputs (tokens, labels, and position /
        document ids where packed), fp32, 0 where the label is -100."""
        with self.model(policy) as ref:
            logits, vocab_start, group = vocab_logits(ref, inputs["tokens"], inputs.get("position_ids"),
                                                      inputs.get("document_ids"))
            return token_logprobs(logits, inputs["labels"], vocab_start, group, temperature)


def load_reference(path: Optional[str], policy: nn.Module) -> nn.Module:
    """A frozen copy of the model in checkpoint `path`, in `policy`'s architecture, parallel layout,
    device and dtype (this rank's tensor-parallel shard), in eval mode."""
    from megalm import checkpoint as ckpt
    from megalm.config import Config
    if not path:
        raise ValueError("the reference policy needs the starting checkpoint: give --load (or --ref-load)")
    p = policy.parallel
    found = ckpt.find_checkpoint(path, p.rank, layout=p.layout(),
                                 model_parallel_rank=(p.tensor_model_parallel_rank, p.pipeline_model_parallel_rank,
                                                      p.expert_model_parallel_rank))
    if found is None:
        raise ckpt.CheckpointError(f"the reference checkpoint {path} holds no checkpoint (no iter_XXXXXXX directory)")
    ckpt.check_architecture(found["metadata"]["config"], Config(model=policy.config), found["path"])
    param = next(policy.parameters())
    # Its initial values are overwritten: built with the generators' states restored afterwards.
    with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []):
        reference = GPTModel(policy.config, p)
    own = reference.state_dict()
    missing = sorted(k for k in own if k not in found["model"])
    if missing:
        raise ckpt.CheckpointError(f"the reference checkpoint {found['path']} does not match the model: missing "
                                   f"{missing}")
    reference.load_state_dict({k: found["model"][k] for k in own})
    return reference.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
