"""The paged KV cache: a fixed pool of blocks, reference counts, and a prefix index.

A block holds ``block_size`` consecutive tokens of one sequence. A block that is full is
identified by a chained hash (its tokens plus the hash of the block before it, nano-vllm
style), so a later request whose token prefix matches reuses the block's K/V instead of
recomputing it. Shared blocks carry a reference count and are never handed out while in
use; blocks nobody references but whose content is indexed stay cached and are evicted
least-recently-freed first when the pool runs out.

Reuse is token-granular at the end of a match (SGLang-radix-like within the block design):
every indexed block, full or not, is also listed under its parent's chained hash, and a
sequence's last, partly filled block is indexed when the sequence is released. A new prompt
whose tokens run past its last fully matched block into such a child block (fully or up to
where they diverge) gets those tokens' K/V copied into a fresh block it owns (copy-on-write:
the indexed block stays shared-read-only and may be evicted later), so only the tokens after
the common prefix are recomputed. An agent's next step, which extends the previous step's
tokens, is thus served all of the previous step's computed tokens, not just its full blocks.

A finished sequence with a cache key (an agent run's id) keeps its blocks *pinned* under that key
until the key's next sequence is admitted, the key is released, or ``pin_ttl_s`` passes, so a
crowded pool evicts other cached blocks before the prefix a run is about to reuse (while its tools
run). Pins never cost admission: when the pool runs short, the oldest pins are released first.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import torch

# copy_kv(src_block, dst_block, num_tokens): copy the first num_tokens slots' K/V of one block to another
CopyKV = Callable[[int, int, int], None]


def block_hash(prev_hash: int, tokens: tuple[int, ...]) -> int:
    """The chained hash of a full block (prev_hash = -1 for the first block)."""
    return hash((prev_hash, tokens))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1  # != -1 only while registered in the prefix index as a full block
    tokens: tuple[int, ...] = ()  # the computed tokens of an indexed block (full or partial)
    parent: int | None = None  # the chained hash it is listed under in `children`; None = not indexed


class BlockManager:
    """Allocates KV blocks to sequences and keeps the prefix index.

    A sequence is anything with ``token_ids`` (list[int]), ``block_table`` (list[int]),
    ``block_hashes`` (list[int]: chained hashes of its full blocks, filled as they fill)
    and ``num_computed_tokens`` (int).

    ``copy_kv`` (the K/V pools' `KVCache.copy_block_prefix`) enables token-granular reuse of a
    partly matching block; without it matches stop at the last fully matching block.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 copy_kv: CopyKV | None = None, pin_ttl_s: float = 0.0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.copy_kv = copy_kv
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # (parent's chained hash or -1, first token) -> indexed blocks (full or partial) there
        self.children: dict[tuple[int, int], set[int]] = {}
        self._free_plain: deque[int] = deque(range(num_blocks))  # free, content not indexed
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free but indexed; oldest first = LRU
        self.hit_tokens = 0
        self.queried_tokens = 0
        self.pin_ttl_s = pin_ttl_s if enable_prefix_caching else 0.0
        # cache key -> (its blocks, when the pin expires on the monotonic clock); oldest pin first
        self._pins: OrderedDict[str, tuple[list[int], float]] = OrderedDict()
        self._pin_refs: Counter[int] = Counter()  # block -> how many pins hold it
        self.pins_released_early = 0  # pins given up to make room (pressure), not by their key or TTL

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (plain free ones plus evictable cached ones)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live sequence (pins alone do not count: they give way)."""
        pinned_only = sum(1 for bid, n in self._pin_refs.items() if self.blocks[bid].ref_count == n)
        return self.num_blocks - self.num_free - pinned_only

    @property
    def num_cached(self) -> int:
        """Blocks whose content is in the prefix index (in use or not)."""
        return len(self.hash_to_block)

    @property
    def num_partial_cached(self) -> int:
        """Partly filled blocks kept indexed after their sequence was released."""
        return sum(1 for b in self.blocks if b.parent is not None and b.hash == -1)

    @property
    def num_pinned(self) -> int:
        """Blocks held by pins (counted once however many pins hold them)."""
        return len(self._pin_refs)

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
        if self.enable_prefix_caching and self.copy_kv is not None:
            seq.num_computed_tokens += self._match_partial(seq, prev)
        return seq.num_computed_tokens

    def _match_partial(self, seq, parent: int) -> int:
        """Copy the K/V of the longest common token prefix with an indexed child of ``parent``
        into a fresh block appended to ``seq.block_table``; returns the number of tokens copied."""
        start = len(seq.block_table) * self.block_size
        want = seq.token_ids[start:min(start + self.block_size, len(seq.token_ids) - 1)]
        if not want:
            return 0
        best, best_n = -1, 0
        for bid in self.children.get((parent, want[0]), ()):
            n = _common_prefix_len(self.blocks[bid].tokens, want)
            if n > best_n:
                best, best_n = bid, n
        if best_n == 0:
            return 0
        self._ref(best)  # so taking a fresh block cannot evict the source
        try:
            if self.num_free == 0:
                return 0
            dst = self._take_free()
            self.copy_kv(best, dst, best_n)
            seq.block_table.append(dst)
        finally:
            self._unref(best)
        return best_n

    def record_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.queried_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens

    # ---- growth and release ---------------------------------------------------------------------
    def can_grow(self, seq, num_tokens: int) -> bool:
        """True if ``seq`` can hold ``num_tokens`` tokens after allocating new blocks; releases the
        oldest pins first when the free blocks alone are too few."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        while need > self.num_free and self._pins:
            self.unpin(next(iter(self._pins)))
            self.pins_released_early += 1
        return need <= self.num_free

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
                self._index_child(blk, seq.block_hashes[i - 1] if i else -1)

    def free(self, seq, pin_key: str | None = None) -> None:
        """Release every block of ``seq`` (tail first, so the tail is evicted before the head).

        The computed tokens of its last, partly filled block stay indexed (see `match_prefix`). With
        ``pin_key`` (and a pin TTL), the blocks stay pinned under it (see `pin`)."""
        self._index_partial(seq)
        if pin_key is not None and self.pin_ttl_s > 0 and seq.block_table:
            self.pin(pin_key, seq.block_table)
        for bid in reversed(seq.block_table):
            self._unref(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _index_partial(self, seq) -> None:
        bs = self.block_size
        n_full, n_part = divmod(seq.num_computed_tokens, bs)
        if (not self.enable_prefix_caching or n_part == 0 or n_full >= len(seq.block_table)
                or len(seq.block_hashes) < n_full):  # no chain known (e.g. engine.prompt_logits)
            return
        blk = self.blocks[seq.block_table[n_full]]
        if blk.parent is not None or blk.ref_count != 1:
            return  # already indexed, or shared (then it is a full block of another sequence)
        parent = seq.block_hashes[n_full - 1] if n_full else -1
        toks = tuple(seq.token_ids[n_full * bs:n_full * bs + n_part])
        siblings = self.children.get((parent, toks[0]), ())
        if any(self.blocks[b].tokens[:n_part] == toks for b in siblings):
            return  # an indexed block already holds these tokens (e.g. the one this was copied from)
        blk.tokens = toks
        self._index_child(blk, parent)

    # ---- pins -------------------------------------------------------------------------------------
    def pin(self, key: str, blocks: list[int]) -> None:
        """Hold ``blocks`` under ``key`` for ``pin_ttl_s`` (replacing the key's earlier pin)."""
        for bid in blocks:
            self._ref(bid)
        self._pin_refs.update(blocks)
        earlier = self._pins.pop(key, None)
        self._pins[key] = (list(blocks), time.monotonic() + self.pin_ttl_s)
        if earlier is not None:
            self._unref_all(earlier[0])

    def unpin(self, key: str) -> None:
        """Release ``key``'s pin (nothing if there is none): its blocks become evictable cache again."""
        pinned = self._pins.pop(key, None)
        if pinned is not None:
            self._unref_all(pinned[0])

    def expire_pins(self, now: float | None = None) -> None:
        """Release the pins whose TTL has passed (``now`` on the monotonic clock). Called every step: pins
        are kept in the order they were made, all with the same TTL, so it stops at the first one alive."""
        now = time.monotonic() if now is None else now
        while self._pins:
            key, (_, expires) = next(iter(self._pins.items()))
            if expires > now:
                return
            self.unpin(key)

    def _unref_all(self, blocks: list[int]) -> None:
        self._pin_refs.subtract(blocks)
        for bid in reversed(blocks):  # tail first: evicted before the head
            if self._pin_refs[bid] <= 0:
                del self._pin_refs[bid]
            self._unref(bid)

    # ---- internals -------------------------------------------------------------------------------
    def _index_child(self, blk: Block, parent: int) -> None:
        blk.parent = parent
        self.children.setdefault((parent, blk.tokens[0]), set()).add(blk.block_id)

    def _ref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            self._free_cached.pop(bid, None)
        blk.ref_count += 1

    def _unref(self, bid: int) -> None:
        blk = self.blocks[bid]
        blk.ref_count -= 1
        assert blk.ref_count >= 0, f"block {bid} released twice"
        if blk.ref_count == 0:
            if blk.parent is not None:  # indexed (full or partial): evictable, most recent last
                self._free_cached[bid] = None
            else:
                self._free_plain.append(bid)

    def _take_free(self) -> int:
        if self._free_plain:
            bid = self._free_plain.popleft()
        else:
            bid, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            blk = self.blocks[bid]
            if blk.hash != -1 and self.hash_to_block.get(blk.hash) == bid:
                del self.hash_to_block[blk.hash]
            key = (blk.parent, blk.tokens[0]) if blk.parent is not None else None
            siblings = self.children.get(key)
            if siblings is not None:
                siblings.discard(bid)
                if not siblings:
                    del self.children[key]
        blk = self.blocks[bid]
        blk.hash, blk.tokens, blk.parent, blk.ref_count = -1, (), None, 1
        return bid


def _common_prefix_len(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVCache:
    """The K and V pools: [layers, num_blocks * block_size, n_kv_heads, head_dim] each.

    Allocated with ``torch.empty`` so pages are touched only when written.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def copy_block_prefix(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the K/V of the first ``num_tokens`` slots of block ``src`` into block ``dst``
        (the copy-on-write of a partly reused block; a few hundred KB for a small model)."""
        s, d = src * self.block_size, dst * self.block_size
        self.k[:, d:d + num_tokens] = self.k[:, s:s + num_tokens]  # [layers, n, n_kv, head_dim]
        self.v[:, d:d + num_tokens] = self.v[:, s:s + num_tokens]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
