"""How far past the positions a model was trained with inference may go.

A learned absolute position table has one row per position (`max_positions`): a longer sequence has
no embedding to look up, so it is refused before any work starts. RoPE computes any position, but a
model has only seen the ones it was trained with; past them the outputs (and any perplexity) measure
how the model extrapolates, so the caller is warned once and goes on.
"""

from __future__ import annotations

from typing import Optional

from megalm.config import ModelConfig


def check_context_length(config: ModelConfig, length: int, what: str, fix: str) -> Optional[str]:
    """Check that `length` tokens (`what`, e.g. "--seq-length 1024") fit the model of `config`.

    Past a learned position table: ValueError naming both lengths and `fix`. Past a RoPE model's
    trained positions: returns the warning to show. None when the length fits.
    """
    trained = config.max_positions
    if length <= trained:
        return None
    if config.position_embedding_type == "learned_absolute":
        raise ValueError(f"{what} is longer than the model's {trained} positions (its learned position embeddings "
                         f"have no row past position {trained - 1}): {fix}")
    return (f"the model was trained with {trained} positions and {what} goes past them: results beyond position "
            f"{trained} measure how it extrapolates")
