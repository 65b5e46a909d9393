"""A paged KV cache (Kwon et al. 2023, vLLM's PagedAttention): keys and values live in fixed-size
blocks drawn from one pool, and each sequence owns a block table listing its blocks in order.

A sequence takes a block only when its tokens reach it, so memory follows the tokens actually
cached, not the longest sequence that could be asked for; a finished sequence returns its blocks
to the free list at once and the next request reuses them.

`PagedBatch` is one forward step over some of the sequences: it speaks the model's `KVCache`
interface (`megalm.model.attention`), so `GPTModel.hidden_states` runs unchanged. Each row may hold
a different number of cached tokens and of new tokens (right-padded to the longest). Per layer the
new keys and values are written into their slots, then every row's keys are gathered from its
blocks into [b, L, g, d] (L the longest row) and attention sees only that row's real keys, causally:
each row computes what it would compute alone. Positions (RoPE or learned) count from each
sequence's own first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megalm.config import ModelConfig


class CacheExhausted(RuntimeError):
    """No free block is left; the caller frees or preempts a sequence and tries again."""


class BlockAllocator:
    """A free list of block ids 0 .. num_blocks - 1."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a paged KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheExhausted(f"all {self.num_blocks} KV cache blocks are in use")
        return self._free.pop()

    def free(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if not 0 <= block < self.num_blocks or block in self._free:
                raise ValueError(f"block {block} is not an allocated block of this cache")
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """The block pool of every layer (one row per slot: [num_blocks * block_size, g, d] keys and values
    each) and the block table of every sequence (by id).

    `query_groups`: the key/value heads this process holds (under tensor parallelism, its share)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.float32,
                 query_groups: Optional[int] = None):
        if block_size < 1:
            raise ValueError(f"the KV cache block size must be positive, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_blocks * block_size, query_groups or config.query_groups, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.tables: dict = {}  # sequence id -> [block ids]
        self.lengths: dict = {}  # sequence id -> tokens cached
        self.peak_blocks = 0

    @property
    def capacity(self) -> int:
        """Tokens the pool holds."""
        return self.allocator.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        return self.allocator.num_blocks - self.allocator.num_free

    def blocks_needed(self, seq_id, new_tokens: int) -> int:
        """Blocks `seq_id` must still take to hold `new_tokens` more tokens than it has cached."""
        length = self.lengths.get(seq_id, 0) + new_tokens
        return max(0, -(-length // self.block_size) - len(self.tables.get(seq_id, ())))

    def reserve(self, seq_id, new_tokens: int) -> None:
        """Take the blocks for `new_tokens` more tokens of `seq_id` (all or none: CacheExhausted)."""
        needed = self.blocks_needed(seq_id, new_tokens)
        if needed > self.allocator.num_free:
            raise CacheExhausted(f"{needed} more KV cache blocks are needed and {self.allocator.num_free} are free")
        table = self.tables.setdefault(seq_id, [])
        self.lengths.setdefault(seq_id, 0)
        table.extend(self.allocator.allocate() for _ in range(needed))
        self.peak_blocks = max(self.peak_blocks, self.used_blocks)

    def release(self, seq_id) -> None:
        """Return the blocks of `seq_id` to the free list (a finished, aborted or preempted sequence)."""
        self.allocator.free(self.tables.pop(seq_id, []))
        self.lengths.pop(seq_id, None)

    def layout(self, seq_ids: Sequence, new_tokens: Sequence[int], packed: bool = False) -> "StepLayout":
        """Where a step over `seq_ids`, each adding new_tokens[i] tokens, reads and writes (blocks reserved)."""
        device = self.keys[0].device
        cached = [self.lengths[i] for i in seq_ids]
        width = -(-max(c + n for c, n in zip(cached, new_tokens)) // self.block_size)
        tables = torch.zeros(len(seq_ids), width, dtype=torch.long)
        for row, (seq_id, c, n) in enumerate(zip(seq_ids, cached, new_tokens)):
            blocks = self.tables[seq_id]
            if len(blocks) * self.block_size < c + n:
                raise ValueError(f"sequence {seq_id} has {len(blocks)} blocks for {c + n} tokens: "
                                 f"reserve its blocks before the step")
            tables[row, :min(len(blocks), width)] = torch.tensor(blocks[:width])
        return StepLayout(torch.tensor(cached, device=device), torch.tensor(list(new_tokens), device=device),
                          tables.to(device), packed)

    def batch(self, seq_ids: Sequence, new_tokens: Sequence[int], packed: bool = False) -> "PagedBatch":
        """A step over `seq_ids` that records their new lengths once the model has run it."""
        return PagedBatch(self, self.layout(seq_ids, new_tokens, packed), list(seq_ids))


@dataclass
class StepLayout:
    """One step's sequences: tokens already cached [b], new tokens [b], block tables [b, W]. Three
    tensors, so that every tensor-parallel rank can be sent the same step."""
    cached: torch.Tensor
    new: torch.Tensor
    tables: torch.Tensor
    packed: bool = False  # the new tokens as one row (see PagedBatch)


class PagedBatch:
    """One forward step over several sequences of a `PagedKVCache`, with the model's KV cache interface.
    With `seq_ids` the cache's lengths advance after the step; without, only the pools are touched
    (a tensor-parallel rank that follows another's scheduling).

    Two layouts of the new tokens: one row per sequence, right-padded to the longest ([b, s]), or
    all of them packed into one row ([1, T], `StepLayout.packed`), which wastes no compute on padding
    when prompts and single decode tokens share a step (attention then spans every sequence's keys,
    masked to the query's own sequence)."""

    def __init__(self, cache: PagedKVCache, layout: StepLayout, seq_ids: Optional[list] = None):
        self.cache, self.seq_ids = cache, seq_ids
        self.cached, self.new = layout.cached, layout.new
        self.total = self.cached + self.new
        bs = cache.block_size
        # Each sequence's slots, in token order: [b, longest].
        longest = int(self.total.max())
        positions = torch.arange(longest, device=self.cached.device)
        slots = layout.tables[:, positions // bs] * bs + positions % bs
        (self._packed if layout.packed else self._rows)(slots, longest)
        # The model reads seq_len for its position-table check and left_padding to take the masked path;
        # there is no left padding: each sequence starts at slot 0 of its first block.
        self.left_padding = torch.zeros(self.queries.shape[0], dtype=torch.long, device=self.cached.device)

    def _rows(self, slots: torch.Tensor, longest: int) -> None:
        device = slots.device
        self.width = int(self.new.max())  # s: the right-padded step width
        self.seq_len = int(self.cached.max())
        steps = torch.arange(self.width, device=device)[None, :]
        self.queries = self.cached[:, None] + steps.minimum(self.new[:, None] - 1)  # [b, s]; padding repeats
        real = steps < self.new[:, None]  # [b, s]: not padding
        self.real_rows = real.flatten().nonzero().squeeze(1)  # in the [b * s] new tokens
        self.write_slots = slots.gather(1, self.queries)[real]
        self.gather_slots = slots  # [b, L]
        self.last = (torch.arange(len(self.new), device=device), self.new - 1)
        keys = torch.arange(longest, device=device)
        # Query t of a row sees that row's keys up to its own position and none past the row's end.
        self.mask = ((keys[None, None, :] <= self.queries[:, :, None])
                     & (keys[None, None, :] < self.total[:, None, None]))[:, None]  # [b, 1, s, L]

    def _packed(self, slots: torch.Tensor, longest: int) -> None:
        device = slots.device
        b = len(self.new)
        rows = torch.arange(b, device=device)
        token_seq = rows.repeat_interleave(self.new)  # [T]: whose token
        starts = torch.cumsum(self.new, 0) - self.new
        positions = self.cached[token_seq] + torch.arange(len(token_seq), device=device) - starts[token_seq]
        key_seq = rows.repeat_interleave(self.total)  # [K]: every sequence's keys, one after the other
        key_pos = torch.arange(len(key_seq), device=device) - (torch.cumsum(self.total, 0) - self.total)[key_seq]
        self.width, self.seq_len = len(token_seq), 0
        self.queries = positions[None]  # [1, T]
        self.real_rows = torch.arange(self.width, device=device)
        self.write_slots = slots[token_seq, positions]
        self.gather_slots = slots[key_seq, key_pos][None]  # [1, K]
        self.last = (torch.zeros(b, dtype=torch.long, device=device), starts + self.new - 1)
        self.mask = ((key_seq[None, :] == token_seq[:, None]) & (key_pos[None, :] <= positions[:, None]))[None, None]

    def position_ids(self, s: int) -> torch.Tensor:
        """Positions of the step's new tokens, each counted in its own sequence: [rows, s]."""
        if s != self.width:
            raise ValueError(f"this step was laid out for {self.width} new positions per row, not {s}")
        return self.queries

    def attention_mask(self, s: int) -> torch.Tensor:
        """[rows, 1, s, keys] bool, True where a query may attend a key (the same for every layer)."""
        if s != self.width:
            raise ValueError(f"this step was laid out for {self.width} new positions per row, not {s}")
        return self.mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the real tokens of k, v [b, s, g, d]; return every row's keys and values [b, L, g, d]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        b, s, g, d = k.shape
        # index_copy_ / index_select: much faster on CPU than indexing by a tensor (index_put / gather).
        keys.index_copy_(0, self.write_slots, k.reshape(b * s, g, d).index_select(0, self.real_rows))
        values.index_copy_(0, self.write_slots, v.reshape(b * s, g, d).index_select(0, self.real_rows))
        slots = self.gather_slots.flatten()
        shape = (b, self.gather_slots.shape[1], g, d)
        return keys.index_select(0, slots).view(shape), values.index_select(0, slots).view(shape)

    def advance(self, n: int) -> None:
        """After the model's step: each row now caches its new tokens."""
        for seq_id, added in zip(self.seq_ids or (), self.new.tolist()):
            self.cache.lengths[seq_id] += added
        self.seq_len += n
