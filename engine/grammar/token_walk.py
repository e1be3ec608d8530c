"""A state's allowed tokens, computed when a matcher first reaches it: the vocabulary's byte trie walked
through the byte DFA in C++ (`TokenTrie`, agentrt_token_walk in regex_dfa.cpp): a prefix many tokens share
is stepped once, a dead one cuts its subtree, and inside a string, where most tokens stay alive and most
of those stay in the same state (the string's body loops on every plain character), a subtree whose
bytes all loop there is taken whole. numpy's walk (every token at once, one gather per byte position)
stays for walks over a subset of the tokens and where the C++ library cannot be built.

So a compile costs the byte DFA alone, and a grammar pays per state it visits: tens of microseconds for
a state with few choices (a key, punctuation), a few hundred inside a string.
"""
from __future__ import annotations

import threading

import numpy as np

from . import native_dfa
from .byte_dfa import ByteDFA, concat_ranges
from .vocab import TokenVocab


_MANY_LOOPS = 16  # a state where more bytes than this loop back (a string's body) takes the shortcut


class TokenTable:
    """The vocabulary's token bytes, grouped by first byte and stored a byte position at a time,
    built once per vocabulary and shared by every grammar of it."""

    def __init__(self, vocab: TokenVocab):
        items = sorted(vocab.token_bytes.items(), key=lambda kv: (kv[1][0], len(kv[1])))
        self.ids = np.fromiter((tid for tid, _ in items), np.int32, len(items))  # [V] by first byte
        self.width = vocab.vocab_size
        self.lengths = np.fromiter((len(b) for _, b in items), np.int32, len(items))  # [V]
        longest = int(self.lengths.max()) if items else 0
        rows = np.zeros((len(items), max(longest, 1)), dtype=np.uint8)  # [V, L] zero past each token's end
        for i, (_, b) in enumerate(items):
            rows[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
        self.positions = [np.ascontiguousarray(rows[:, j]) for j in range(rows.shape[1])]  # L x [V] uint8
        used = np.zeros((len(items), 256), dtype=bool)  # [V, 256] the bytes each token holds
        for j in range(rows.shape[1]):
            within = self.lengths > j
            used[np.flatnonzero(within), rows[within, j]] = True
        self.byte_sets = np.packbits(used, axis=1, bitorder="little").view(np.uint64)  # [V, 4]
        firsts = rows[:, 0] if items else np.zeros(0, np.uint8)
        self.first_start = np.searchsorted(firsts, np.arange(257))  # byte b's tokens: rows first_start[b]:[b+1]
        self.trie = TokenTrie(vocab.token_bytes)
        self._native = native_dfa.library()
        self._scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._scratch_lock = threading.Lock()

    def walk(self, dfa: ByteDFA, state: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(allowed token ids [n] int64 ascending, the state each leads to [n] int64) from ``state``;
        only the tokens where ``among`` [vocab_size] bool is True, when given."""
        if (among is None and self._native is not None and dfa.columns.flags.c_contiguous
                and dfa.columns.dtype in (np.uint16, np.int32)):
            return self._walk_native(dfa, state)
        flat, classes, width, dead = dfa.columns.ravel(), dfa.classes, dfa.columns.shape[1], dfa.dead
        live = dfa.live_bytes(state)
        if not live.size:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lo = self.first_start[live]
        counts = self.first_start[live + 1] - lo
        rows = concat_ranges(lo, counts)  # [n] candidates
        if among is not None:
            rows = rows[among[self.ids[rows]]]
        done_rows, done_states = [], []
        cur = flat[np.int64(state) * width + classes[self.positions[0][rows]]].astype(np.int64)  # [n] alive: first byte live
        for target in np.flatnonzero(np.bincount(cur)).tolist():
            loops = dfa.row(target) == target  # [256] bytes that stay in ``target`` (a string's body: most)
            if loops.sum() <= _MANY_LOOPS:
                continue
            # a token that got to ``target`` and holds no other bytes stays there: no walk for it
            outside = ~np.packbits(loops, bitorder="little").view(np.uint64)  # [4]
            stays = (cur == target) & ~(self.byte_sets[rows] & outside).any(axis=1)
            done_rows.append(rows[stays])
            done_states.append(cur[stays])
            rows, cur = rows[~stays], cur[~stays]
        j = 1
        while rows.size:
            ended = self.lengths[rows] == j
            if ended.any():
                done_rows.append(rows[ended])
                done_states.append(cur[ended])
                rows, cur = rows[~ended], cur[~ended]
                if not rows.size:
                    break
            cur = flat[cur * width + classes[self.positions[j][rows]]].astype(np.int64)
            alive = cur != dead
            rows, cur = rows[alive], cur[alive]
            j += 1
        if not done_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = self.ids[np.concatenate(done_rows)].astype(np.int64)
        ends = np.concatenate(done_states)
        if ids.size < 4096:
            order = np.argsort(ids)
            return ids[order], ends[order]
        by_id = np.full(self.width, -1, dtype=np.int64)  # [vocab_size] the state each allowed token leads to
        by_id[ids] = ends
        ids = np.flatnonzero(by_id >= 0)  # ascending without a sort: a sort of ~50k ids cost 3 ms
        return ids, by_id[ids]

    def _walk_native(self, dfa: ByteDFA, state: int) -> tuple[np.ndarray, np.ndarray]:
        """`walk` in C++, down the vocabulary's trie (a string's state keeps most of the vocabulary:
        numpy's passes over it took milliseconds)."""
        columns, t = dfa.columns, self.trie
        with self._scratch_lock:  # one walk at a time on the scratch arrays (ctypes lets go of the GIL)
            if self._scratch is None:  # allocated once: fresh ones each walk cost their page faults
                self._scratch = (np.full(self.width, -1, np.int32), np.empty(t.tokens, np.int64),
                                 np.empty(t.tokens, np.int64))
            by_id, ids, ends = self._scratch
            m = self._native.agentrt_token_walk(
                columns.ctypes.data, columns.itemsize, columns.shape[1], dfa.classes.ctypes.data, dfa.dead, state,
                t.byte.ctypes.data, t.depth.ctypes.data, t.skip.ctypes.data, t.token.ctypes.data, t.rank.ctypes.data,
                t.ranked.ctypes.data, t.ranked_len.ctypes.data, t.deepest.ctypes.data, t.below.ctypes.data,
                t.byte.size, t.max_depth, self.width, by_id.ctypes.data, ids.ctypes.data, ends.ctypes.data)
            if m < 0:
                by_id.fill(-1)
                raise MemoryError("walking the vocabulary's trie")
            return ids[:m].copy(), ends[:m].copy()


class TokenTrie:
    """The vocabulary's tokens as a byte trie, its nodes in preorder (the order of the tokens' sorted
    bytes): node i holds ``byte[i]`` at ``depth[i]`` (1 under the root), ends token ``token[i]`` (-1:
    none) and its subtree ends before node ``skip[i]``; its subtree's tokens are ``ranked[rank[i + 1]:
    rank[skip[i]]]`` (``ranked_len``: their lengths) and ``deepest[i]`` is the depth of its deepest node.
    Two tokens of the same bytes are sibling nodes."""

    def __init__(self, token_bytes: dict[int, bytes]):
        items = sorted((b, tid) for tid, b in token_bytes.items() if b)
        blobs, ids = [b for b, _ in items], [tid for _, tid in items]
        self.tokens = len(items)
        lengths = np.fromiter(map(len, blobs), np.int64, len(items))  # [T]
        longest = int(lengths.max()) if items else 0
        padded = np.zeros((len(items), longest + 1), dtype=np.int16)  # [T, L + 1] byte + 1, 0 past the end
        flat = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.int16) + 1
        row_of = np.repeat(np.arange(len(items)), lengths)
        col_of = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        padded[row_of, col_of] = flat
        # bytes shared with the token before (sorted, so its nodes are the last ones made on that path);
        # the same bytes again make a sibling of the last node
        same = (padded[1:] == padded[:-1]) & (padded[1:] != 0)  # [T - 1, L + 1]
        common = np.zeros(len(items), dtype=np.int64)
        common[1:] = np.argmin(same, axis=1)
        common = np.minimum(common, lengths - 1)
        fresh = lengths - common  # [T] new nodes per token
        first = np.cumsum(fresh) - fresh  # [T] each token's first new node
        n = int(fresh.sum())
        owner = np.repeat(np.arange(len(items)), fresh)  # [N] the token that made each node
        position = np.repeat(common, fresh) + np.arange(n) - np.repeat(first, fresh)  # [N] 0-based byte index
        self.byte = (padded[owner, position] - 1).astype(np.uint8)  # [N]
        self.depth = (position + 1).astype(np.int32)  # [N]
        self.token = np.full(n, -1, dtype=np.int32)  # [N]
        self.token[first + fresh - 1] = np.array(ids, dtype=np.int32)
        self.max_depth = longest
        self.ranked = self.token[self.token >= 0]  # [T] the tokens in node order
        self.ranked_len = self.depth[self.token >= 0]  # [T] their lengths in bytes
        self.rank = np.zeros(n + 1, dtype=np.int32)  # [N + 1] tokens ending before each node
        np.cumsum(self.token >= 0, out=self.rank[1:])
        # a node's parent: the last node before it one level up; its subtree ends at the next node no
        # deeper than it (the end for the last ones): level by level, with binary searches
        parent = np.full(n, -1, dtype=np.int64)
        self.skip = np.full(n, n, dtype=np.int32)
        above = np.zeros(0, dtype=np.int64)  # the nodes of depth d - 1
        for d in range(1, longest + 1):
            at = np.flatnonzero(self.depth == d)
            if d > 1:
                parent[at] = above[np.searchsorted(above, at) - 1]
            upto = np.flatnonzero(self.depth <= d)  # ascending
            after = np.searchsorted(upto, at, side="right")
            self.skip[at] = np.where(after < upto.size, upto[np.minimum(after, upto.size - 1)], n)
            above = at
        # the bytes under each node (its own not among them) and the depth of its deepest node, deepest
        # level first into the parents
        below = np.zeros((n, 4), dtype=np.uint64)  # [N, 4] a 256-bit set
        own = np.zeros((n, 4), dtype=np.uint64)
        own[np.arange(n), self.byte >> 6] = np.left_shift(np.uint64(1), (self.byte & 63).astype(np.uint64))
        self.deepest = self.depth.copy()  # [N]
        for d in range(self.max_depth, 1, -1):
            at = np.flatnonzero(self.depth == d)
            np.bitwise_or.at(below, parent[at], below[at] | own[at])
            np.maximum.at(self.deepest, parent[at], self.deepest[at])
        self.below = below
