"""How far past the positions a model was trained with inference may go: `check_context_length`,
which lives with the model's generation (`megalm.model.context`) and is re-exported here."""

from megalm.model.context import check_context_length

__all__ = ["check_context_length"]
