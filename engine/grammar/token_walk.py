"""A state's allowed tokens, computed when a matcher first reaches it: every token of the vocabulary
walked through the byte DFA at once (numpy, one gather per byte position), starting with only the
tokens whose first byte the state allows.

So a compile costs the byte DFA alone, and a grammar pays per state it visits: ~0.05 ms for a state
with few choices (a key, punctuation). Inside a string most tokens stay alive, and most of those
stay in the same state (the string's body loops on every plain character): those are found from each
token's set of bytes at once, and only the rest (quotes, escapes) are walked.
"""
from __future__ import annotations

import numpy as np

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

    def walk(self, dfa: ByteDFA, state: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(allowed token ids [n] int64 ascending, the state each leads to [n] int64) from ``state``;
        only the tokens where ``among`` [vocab_size] bool is True, when given."""
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
