"""Failing together: a checkpoint step that fails on one rank must stop every rank.

Each rank writes or reads its own files, so a full disk, a missing permission or a corrupt shard
may hit one rank only; the others would go on to the next collective and wait there until the
timeout, and the message would be in that rank's log only (under torchrun, rank 0 prints). Every
rank therefore says whether its step failed and why; the first failure's message, prefixed with
its rank, is raised on every rank.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist

from megalm.checkpoint.files import CheckpointError
from megalm.parallel.state import ParallelState


def first_failure(state: ParallelState, message: Optional[str]) -> Optional[str]:
    """The message of the lowest rank whose step failed (None when none did). A collective: every
    rank must call it, with its own message or None."""
    if not state.distributed:
        return message
    every = [None] * state.world_size
    dist.all_gather_object(every, message)
    return next((m if r == state.rank else f"rank {r}: {m}" for r, m in enumerate(every) if m is not None), None)


def on_every_rank(state: ParallelState, step: Callable[[], object],
                  on_failure: Optional[Callable[[], None]] = None):
    """Run `step` on this rank and return its result; when it raised on any rank, call `on_failure`
    (on every rank) and raise CheckpointError on every rank. Errors that are not CheckpointError
    (an OSError from a directory that cannot be created, say) are named by their type."""
    error = result = None
    try:
        result = step()
    except CheckpointError as e:
        error = e
    except Exception as e:  # anything else a file system throws; KeyboardInterrupt goes through
        error = CheckpointError(f"{type(e).__name__}: {e}")
        error.__cause__ = e
    message = first_failure(state, None if error is None else str(error))
    if message is not None:
        if on_failure is not None:
            on_failure()
        raise error or CheckpointError(message)
    return result
