"""Token budgets: the fewest tokens from each grammar state to a complete value, so a matcher
can close the value in time and max_tokens never cuts a constrained output invalid.

Two measures, both upper bounds and both consistent (from a state at distance ``d`` some allowed
token leads to one at ``d - 1``), so a matcher may keep either within its tokens left:

- `ByteDistances`: fewest single-byte tokens, from the byte DFA alone (a breadth-first search over
  its table: no token walk, so it costs a compile nothing). It over-counts literals (a key's name
  is several bytes but often one token), which matters only when a budget is short.
- `TokenDistances`: fewest real tokens, which needs the allowed tokens of every state. A matcher
  asks for it only when the byte count says its budget cannot fit the value.

The token distances come from a shortest-path search (backwards from the accepting states) over a
subset of the token automaton's real transitions:

- every single-byte token (in byte-level BPE and SentencePiece byte-fallback vocabularies
  every byte a JSON text can hold is one token, so every automaton state reachable by text
  is reached and every byte path to the end is a token path);
- every allowed token in states with few choices (keys, punctuation, literals, enums), so
  jump-forward-style runs count the tokens they really take rather than their bytes;
- in states with many choices (inside strings and numbers: more than a few next bytes, or many
  allowed tokens), the tokens holding JSON punctuation, which can close the string and what
  follows at once (``"}``, ``","``). Only these are walked there, not the whole vocabulary.

Each edge is a real token transition, so ``dist[s]`` is an upper bound on the true fewest
tokens, and it is consistent: from a state with ``dist == d`` some token leads to a state with
``dist == d - 1``. A matcher that keeps ``dist[state] <= tokens left`` therefore always has
an allowed token and ends with a complete value. States the search did not reach (or that
cannot reach the end over these edges, e.g. a vocabulary without single-byte tokens) get an
infinite distance: never admitted while the budget is tight.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .compiler import CompiledGrammar
    from .vocab import TokenVocab

INF = np.iinfo(np.int32).max // 2
_FEW_CHOICES = 1024  # states with at most this many allowed tokens contribute all their edges
_FEW_BYTES = 8  # states allowing more next bytes than this contribute their shortcut edges only
_PUNCTUATION = frozenset(b'"{}[],:')
_MAX_STATES = 200_000  # beyond this the search is skipped (no budget enforcement for the grammar)


_SHORTCUTS: dict[str, np.ndarray] = {}


def _shortcut_tokens(vocab: TokenVocab) -> np.ndarray:
    """[vocab_size] bool: the edges kept in many-choice states (single bytes, punctuation), per vocab."""
    hit = _SHORTCUTS.get(vocab.hash)
    if hit is None:
        hit = np.zeros(vocab.vocab_size, dtype=bool)
        hit[list(vocab.byte_token.values())] = True
        for tid, b in vocab.token_bytes.items():
            if not _PUNCTUATION.isdisjoint(b):
                hit[tid] = True
        _SHORTCUTS[vocab.hash] = hit
    return hit


def distances(grammar: CompiledGrammar) -> TokenDistances:
    """The grammar's TokenDistances (fewest tokens from each state to a complete value), computed on
    first use and kept on the grammar, shared by every budgeted matcher of it."""
    if grammar.token_distances is None:
        with grammar.distances_lock:
            if grammar.token_distances is None:
                grammar.token_distances = TokenDistances(grammar)
    return grammar.token_distances


def min_tokens(grammar: CompiledGrammar) -> int:
    """Tokens the grammar's shortest complete value takes (an upper bound)."""
    return distances(grammar).of(grammar.initial_state())


def byte_distances(grammar: CompiledGrammar) -> ByteDistances:
    """The grammar's ByteDistances, computed on first use and kept on the grammar."""
    if grammar.byte_distances is None:
        with grammar.distances_lock:
            if grammar.byte_distances is None:
                grammar.byte_distances = ByteDistances(grammar)
    return grammar.byte_distances


class ByteDistances:
    """Fewest single-byte tokens from every state of a CompiledGrammar to a complete value (INF
    where the vocabulary's single bytes cannot get there); the same queries as TokenDistances."""

    complete = True

    def __init__(self, grammar: CompiledGrammar):
        self.grammar = grammar
        usable = np.zeros(256, dtype=bool)
        usable[list(grammar.vocab.byte_token)] = True
        self.dist = grammar.dfa.byte_distances(usable)  # [S + 1]; the dead state's is INF
        # over the states text can reach (not the one the end sentinel leads to, which no text does)
        self.max_dist = int(self.dist[grammar.dfa.reachable()].max())

    def of(self, state: int) -> int:
        return int(self.dist[state])

    def successors(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(allowed token ids [n] int64, their target states' distances [n] int32)."""
        ids, ends = self.grammar.successors(state)
        return ids, self.dist[ends]

    def worst_next(self, state: int) -> int:
        _, d = self.successors(state)
        return int(d.max()) if d.size else 0


class TokenDistances:
    """Fewest tokens (upper bound) from every state of a CompiledGrammar to a complete value,
    plus per-state successor arrays (built lazily) for the vectorised tight-budget mask."""

    def __init__(self, grammar: CompiledGrammar):
        self.grammar = grammar
        self.dense: dict[int, int] = {}  # automaton state -> row in ``dist``
        self.dist = np.zeros(1, dtype=np.int32)  # [num_states + 1]; the last row is "unknown" (INF)
        self.max_dist = 0  # largest distance of any state (INF if one is unknown): a budget above it is never tight
        self.complete = False  # False when the search was skipped (too many states)
        self._succ: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._build()

    # -- construction -----------------------------------------------------------------------
    def _build(self) -> None:
        g = self.grammar
        vocab = g.vocab
        shortcut = _shortcut_tokens(vocab)
        start = g.initial_state()
        dense = {start: 0}
        order = [start]
        preds: list[list[int]] = [[]]  # row -> rows with an edge into it
        queue = deque([start])
        while queue:
            s = queue.popleft()
            if g.dfa.live_bytes(s).size > _FEW_BYTES:  # inside a string or number: the shortcuts alone
                _, ends = g.tokens.walk(g.dfa, s, among=shortcut)
            else:
                ids, ends = g.successors(s)
                if ids.size > _FEW_CHOICES:
                    ends = ends[shortcut[ids]]
            row = dense[s]
            for n in np.unique(ends).tolist():
                j = dense.get(n)
                if j is None:
                    if len(order) >= _MAX_STATES:
                        return
                    j = dense[n] = len(order)
                    order.append(n)
                    preds.append([])
                    queue.append(n)
                preds[j].append(row)
        dist = np.full(len(order) + 1, INF, dtype=np.int32)
        frontier = deque(i for i, s in enumerate(order) if g.is_final(s))
        for i in frontier:
            dist[i] = 0
        while frontier:  # breadth-first backwards: unit cost per token
            j = frontier.popleft()
            d = dist[j] + 1
            for i in preds[j]:
                if dist[i] > d:
                    dist[i] = d
                    frontier.append(i)
        self.dense, self.dist, self.complete = dense, dist, True
        self.max_dist = int(dist[:-1].max())

    # -- queries ------------------------------------------------------------------------------
    def of(self, state: int) -> int:
        """Fewest tokens (upper bound) from ``state`` to a complete value; INF if unknown."""
        return int(self.dist[self.dense.get(state, -1)])

    def successors(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(allowed token ids [n] int64, their target states' distances [n] int32), cached per state."""
        hit = self._succ.get(state)
        if hit is None:
            ids, ends = self.grammar.successors(state)
            unknown = len(self.dist) - 1
            rows = [self.dense.get(n, unknown) for n in ends.tolist()]
            hit = self._succ[state] = (ids, self.dist[np.asarray(rows, dtype=np.int64)])
        return hit

    def worst_next(self, state: int) -> int:
        """The largest distance any allowed token leads to (INF if some target is unknown)."""
        _, d = self.successors(state)
        return int(d.max()) if d.size else 0
