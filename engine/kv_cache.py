"""The paged KV cache: a fixed pool of blocks, reference counts, and a prefix index.

A block holds ``block_size`` consecutive tokens of one sequence. A block that is full is
identified by a chained hash (its tokens plus the hash of the block before it, nano-vllm
style), so a later request whose token prefix matches reuses the block's K/V instead of
recomputing it. Shared blocks carry a reference count and are never handed out while in
use; blocks nobody references but whose content is indexed stay cached and are evicted
least-recently-freed first when the pool runs out.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch


def block_hash(prev_hash: int, tokens: tuple[int, ...]) -> int:
    """The chained hash of a full block (prev_hash = -1 for the first block)."""
    return hash((prev_hash, tokens))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1  # != -1 only while registered in the prefix index
    tokens: tuple[int, ...] = ()


class BlockManager:
    """Allocates KV blocks to sequences and keeps the prefix index.

    A sequence is anything with ``token_ids`` (list[int]), ``block_table`` (list[int]),
    ``block_hashes`` (list[int]: chained hashes of its full blocks, filled as they fill)
    and ``num_computed_tokens`` (int).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self._free_plain: deque[int] = deque(range(num_blocks))  # free, content not indexed
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free but indexed; oldest first = LRU
        self.hit_tokens = 0
        self.queried_tokens = 0

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (plain free ones plus evictable cached ones)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose content is in the prefix index (in use or not)."""
        return len(self.hash_to_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix matching ----------------------------------------------------------------------
    def match_prefix(self, seq) -> int:
        """Attach the longest indexed prefix of ``seq.token_ids`` to the (empty) sequence.

        At least one token is always left to compute (its logits are needed). The matched blocks
        are referenced (undo with `free`). Returns the number of cached tokens.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        bs = self.block_size
        hits: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            prev = -1
            max_blocks = (len(seq.token_ids) - 1) // bs
            for i in range(max_blocks):
                toks = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = block_hash(prev, toks)
                bid = self.hash_to_block.get(h)
                if bid is None or self.blocks[bid].tokens != toks:
                    break
                hits.append(bid)
                hashes.append(h)
                prev = h
        for bid in hits:
            self._ref(bid)
        seq.block_table = hits
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hits) * bs
        return len(hits) * bs

    def record_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.queried_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens

    # ---- growth and release ---------------------------------------------------------------------
    def can_grow(self, seq, num_tokens: int) -> bool:
        """True if ``seq`` can hold ``num_tokens`` tokens after allocating new blocks."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq, num_tokens: int) -> None:
        """Allocate blocks so ``seq`` can hold ``num_tokens`` tokens (check `can_grow` first)."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise RuntimeError("KV pool exhausted (the scheduler should have checked can_grow)")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def commit_full_blocks(self, seq) -> None:
        """Index the blocks of ``seq`` that became full of computed tokens (prompt or generated)."""
        bs = self.block_size
        n_full = seq.num_computed_tokens // bs
        prev = seq.block_hashes[-1] if seq.block_hashes else -1
        for i in range(len(seq.block_hashes), n_full):
            toks = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(prev, toks)
            seq.block_hashes.append(h)
            prev = h
            if not self.enable_prefix_caching or h in self.hash_to_block:
                continue
            blk = self.blocks[seq.block_table[i]]
            if blk.hash == -1:
                blk.hash, blk.tokens = h, toks
                self.hash_to_block[h] = blk.block_id

    def free(self, seq) -> None:
        """Release every block of ``seq`` (tail first, so the tail is evicted before the head)."""
        for bid in reversed(seq.block_table):
            blk = self.blocks[bid]
            blk.ref_count -= 1
            assert blk.ref_count >= 0, f"block {bid} released twice"
            if blk.ref_count == 0:
                if blk.hash != -1:
                    self._free_cached[bid] = None
                else:
                    self._free_plain.append(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0

    # ---- internals -------------------------------------------------------------------------------
    def _ref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            self._free_cached.pop(bid, None)
        blk.ref_count += 1

    def _take_free(self) -> int:
        if self._free_plain:
            bid = self._free_plain.popleft()
        else:
            bid, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            blk = self.blocks[bid]
            if self.hash_to_block.get(blk.hash) == bid:
                del self.hash_to_block[blk.hash]
        blk = self.blocks[bid]
        blk.hash, blk.tokens, blk.ref_count = -1, (), 1
        return bid


class KVCache:
    """The K and V pools: [layers, num_blocks * block_size, n_kv_heads, head_dim] each.

    Allocated with ``torch.empty`` so pages are touched only when written.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
