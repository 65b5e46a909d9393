"""Random number generator states, saved per rank so that a resumed run draws the same dropout
masks and data order as the uninterrupted one."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(tracker=None) -> dict:
    """Python, numpy, torch (and CUDA) generator states, and the tensor-parallel tracker's."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tracker is not None and tracker.states:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict, tracker=None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_states(state["tracker"])
