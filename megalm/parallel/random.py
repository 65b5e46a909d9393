"""Random numbers under model parallelism: which dropout masks must agree and which must differ.

Under tensor parallelism a tensor is either replicated on every tensor-parallel rank (the residual
stream without sequence parallelism) or split across them (attention heads, sequence-parallel
shards). A dropout on a replicated tensor must draw the same mask on every rank, or the replicas
drift apart; a dropout on a split tensor must draw different masks, or the shards are correlated.
Megatron-LM solves this with a tracker of named RNG states, and so do we:

- the default generator is seeded with `seed + 100 x pp_rank`: the same on every tensor- and
  data-parallel rank of a stage (replicated regions agree), different across stages;
- the tracker's "model-parallel-rng" state is seeded with `seed + 100 x pp_rank + 2718 + tp_rank`,
  and `tracker.fork()` swaps it in around dropouts of split tensors.

With one tensor-parallel rank the tracker holds no state and `fork()` changes nothing, so a
single-process run draws every mask from the default generator.

Activation recompute must replay the masks of the original forward pass: `checkpoint_context_fn`
gives `torch.utils.checkpoint` a pair of contexts that put the tracker's states back before the
recomputation (the default generator is restored by `checkpoint` itself).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named generator states of one device type, swapped in with `fork(name)`."""

    def __init__(self):
        self.states: Dict[str, torch.Tensor] = {}
        self.device_type = "cpu"

    def reset(self, device_type: str = "cpu") -> None:
        self.states = {}
        self.device_type = device_type

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_state(self.device_type)
        if self.device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device_type)
        _set_state(self.device_type, saved)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from the named state inside the block (no-op when the tracker does not hold it)."""
        if name not in self.states:
            yield
            return
        saved = _get_state(self.device_type)
        _set_state(self.device_type, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(self.device_type, saved)


def model_parallel_seed(seed: int, tracker: RNGTracker, tensor_model_parallel_rank: int,
                        tensor_model_parallel_size: int, pipeline_model_parallel_rank: int,
                        device_type: str = "cpu") -> None:
    """Seed the default generator and the tracker for a run (see the module docstring)."""
    offset = seed + 100 * pipeline_model_parallel_rank
    torch.manual_seed(offset)
    if device_type == "cuda":
        torch.cuda.manual_seed(offset)
    tracker.reset(device_type)
    if tensor_model_parallel_size > 1:
        tracker.add(MODEL_PARALLEL_RNG, offset + 2718 + tensor_model_parallel_rank)


def checkpoint_context_fn(tracker: RNGTracker):
    """`context_fn` for `torch.utils.checkpoint.checkpoint(use_reentrant=False)`: the recomputation
    starts from the tracker states the original forward started from, and leaves the tracker as the
    original forward left it."""
    def context_fn():
        at_forward = {}

        @contextlib.contextmanager
        def forward_context():
            at_forward.update(tracker.get_states())
            yield

        @contextlib.contextmanager
        def recompute_context():
            current = tracker.get_states()
            tracker.set_states(at_forward)
            try:
                yield
            finally:
                tracker.set_states(current)

        return forward_context(), recompute_context()
    return context_fn
