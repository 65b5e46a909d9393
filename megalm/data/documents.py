"""Documents packed into one row: labels, position ids and document ids from the end-of-document token.

Pre-training rows are cut from a stream of documents, each followed by the tokenizer's
end-of-document (EOD) token, so one row usually holds the end of a document, a few whole ones and
the start of another. Megatron-LM's `get_ltor_masks_and_position_ids` then optionally

- `--reset-position-ids`: numbers the positions from 0 again after each EOD token;
- `--reset-attention-mask`: lets no token attend across an EOD token (here: `document_ids`, which
  `megalm.kernels.attention` turns into the mask);
- `--eod-mask-loss`: leaves out of the loss the positions whose input is an EOD token (the
  prediction of the next document's first token from the one before it).

A document ends with its EOD token: the token after an EOD starts the next document. For example,
with EOD = 0 and the row of inputs `[5, 6, 0, 7, 8, 0, 9]`, the document ids are
`[0, 0, 0, 1, 1, 1, 2]` and the position ids `[0, 1, 2, 0, 1, 2, 0]`. `split_documents` derives all of
it from a row of s + 1 tokens; post-training builds its packed batches with the same function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megalm.data.errors import DataError

IGNORE_INDEX = -100  # the label of a position without loss (megalm.model.gpt and the kernels agree)


def document_ids_after_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[..., s] token ids -> [..., s] int64: the number of EOD tokens before each position in its
    row, so a new document starts right after each EOD token."""
    is_eod = (tokens == eod).long()
    return is_eod.cumsum(-1) - is_eod


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """[..., s] document ids -> [..., s] int64: each token's position counted from the start of its
    run of equal ids (0 at every document's first token)."""
    s = document_ids.shape[-1]
    positions = torch.arange(s, device=document_ids.device).expand(document_ids.shape)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return positions - torch.where(starts, positions, 0).cummax(-1).values


def split_documents(tokens: torch.Tensor, eod: int, reset_position_ids: bool = True,
                    reset_attention_mask: bool = True, eod_mask_loss: bool = False) -> dict:
    """[..., s + 1] token ids -> a batch of model inputs, as Megatron-LM's
    get_ltor_masks_and_position_ids makes them:

    - "tokens": the inputs [..., s]; "labels": the next tokens [..., s], with -100 where the input is
      an EOD token if `eod_mask_loss`;
    - "position_ids" [..., s], restarting at 0 after each EOD, if `reset_position_ids`;
    - "document_ids" [..., s] (`document_ids_after_eod`), if `reset_attention_mask`.
    """
    inputs, labels = tokens[..., :-1], tokens[..., 1:].clone()
    if eod_mask_loss:
        labels[inputs == eod] = IGNORE_INDEX
    batch = {"tokens": inputs.contiguous(), "labels": labels}
    if reset_position_ids or reset_attention_mask:
        documents = document_ids_after_eod(inputs, eod)
        if reset_position_ids:
            batch["position_ids"] = positions_in_documents(documents)
        if reset_attention_mask:
            batch["document_ids"] = documents
    return batch


@dataclass(frozen=True)
class DocumentSplit:
    """`split_documents` with the flags of a `DataConfig`, applied to pre-training micro-batches."""
    eod: int
    reset_position_ids: bool
    reset_attention_mask: bool
    eod_mask_loss: bool

    def __call__(self, batch: dict) -> dict:
        """{"tokens": [b, s + 1]} -> the batch `split_documents` makes. A batch that already has labels
        (post-training data, shifted and packed by its own dataset) passes through unchanged."""
        if "labels" in batch:
            return batch
        return split_documents(batch["tokens"], self.eod, self.reset_position_ids, self.reset_attention_mask,
                               self.eod_mask_loss)


def document_split(data_config) -> Optional[DocumentSplit]:
    """The DocumentSplit that --reset-position-ids / --reset-attention-mask / --eod-mask-loss ask for,
    or None without them. The EOD id is the tokenizer's; with --mock-data and no tokenizer (or
    NullTokenizer), --vocab-size - 1, as NullTokenizer defines it."""
    d = data_config
    if not (d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss):
        return None
    eod = _eod_token(d.tokenizer_type or "NullTokenizer", d.tokenizer_model, d.vocab_file, d.merge_file, d.vocab_size)
    return DocumentSplit(eod, d.reset_position_ids, d.reset_attention_mask, d.eod_mask_loss)


@functools.lru_cache(maxsize=8)
def _eod_token(tokenizer_type: str, tokenizer_model: Optional[str], vocab_file: Optional[str],
               merge_file: Optional[str], vocab_size: Optional[int]) -> int:
    """The tokenizer's end-of-document id (loaded once per tokenizer: every evaluation asks again)."""
    from megalm.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=vocab_file,
                               merge_file=merge_file, vocab_size=vocab_size)
    if tokenizer.eod is None:
        raise DataError(f"--reset-position-ids, --reset-attention-mask and --eod-mask-loss split documents at the "
                        f"end-of-document token, but {tokenizer!r} has none: train with a tokenizer that defines "
                        f"one (<|endoftext|>, </s>, <eos>, ...), or drop those flags")
    return int(tokenizer.eod)
