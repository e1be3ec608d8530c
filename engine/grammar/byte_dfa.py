"""Regex -> byte-level DFA: the automaton a compiled grammar keeps. Token masks are not part of it:
`token_walk` computes a state's allowed tokens when a matcher first reaches it.

Our C++ builder (`native_dfa`) writes the DFA's byte-class columns directly (`ByteDFA` keeps those). Where
it is not available, outlines-core builds the DFA (its ``Index`` over a 256-byte vocabulary), which we turn
into a dense numpy table first; two quirks of its ``Index`` shape that conversion:

- it drops a transition that leaves a match state into a non-match state (``a(?:bc)?`` does not
  accept "abc"): it works only for prefix-free languages. So the regex gets an end sentinel
  (U+10FFFF, never generated: byte 0xF4, its lead byte, has no transition) appended, which makes
  every language prefix-free; "may end here" = "the sentinel leads to an accepting state".
- its state ids are sparse; ours are dense, ``0..S-1``, with ``S`` the dead state.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from . import native_dfa, quick
from .automaton import run_bounded
from .errors import GrammarCompileError

SENTINEL = "\U0010FFFF"
_SENTINEL_RE = r"\x{10FFFF}"
SENTINEL_ID = 256  # the sentinel's id in the byte vocabulary outlines-core indexes


class ByteDFA:
    """A byte-level DFA, kept as its distinct byte columns: ``columns[s, classes[b]]`` is the state after
    byte ``b`` from ``s`` (``dead`` if none). A JSON grammar's DFA tells ~30-80 kinds of bytes apart, so
    this is a few times smaller than the dense [S + 1, 256] table, which `table` makes when asked (the
    compile's automaton operations; what runs per request reads the columns), and 16-bit where the state
    ids fit (below 65,536 states)."""

    __slots__ = ("columns", "classes", "final", "initial")

    def __init__(self, table: np.ndarray, final: np.ndarray, initial: int, classes: np.ndarray | None = None):
        """From the dense ``table`` [S + 1, 256] int32 (row S the dead state, mapping every byte to S) and
        ``final`` [S + 1] bool (the value may end there); ``classes`` [256] when known (bytes of one class
        have equal columns: the builder's, or refined from the parts a DFA was made of), else found here."""
        if classes is None:
            classes, columns = byte_classes(table)
        else:
            _, firsts, classes = np.unique(classes, return_index=True, return_inverse=True)
            columns = table[:, firsts]
        self.columns = _narrow(columns)  # [S + 1, C]
        self.classes = classes.astype(np.uint8)  # [256]
        self.final = final
        self.initial = int(initial)

    @classmethod
    def from_columns(cls, columns: np.ndarray, classes: np.ndarray, final: np.ndarray, initial: int) -> ByteDFA:
        """From ``columns`` [S + 1, C] and ``classes`` [256] (values 0..C-1) as `ByteDFA` keeps them."""
        dfa = cls.__new__(cls)
        dfa.columns = _narrow(columns)
        dfa.classes, dfa.final, dfa.initial = classes.astype(np.uint8), final, int(initial)
        return dfa

    @property
    def table(self) -> np.ndarray:
        """The dense table [S + 1, 256] (the columns' dtype), made anew on each call."""
        return self.columns[:, self.classes]

    @property
    def dead(self) -> int:
        return self.columns.shape[0] - 1

    @property
    def num_states(self) -> int:
        return self.columns.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return self.columns.nbytes + self.final.nbytes + self.classes.nbytes

    def __reduce__(self):  # pickled (from a compile worker, to the disk cache) as kept
        return _from_columns, (self.columns, self.classes, self.final, self.initial)

    def next(self, state: int, byte: int) -> int:
        """The state after ``byte`` from ``state``."""
        return int(self.columns[state, self.classes[byte]])

    def row(self, state: int) -> np.ndarray:
        """[256] the state after each byte from ``state``."""
        return self.columns[state][self.classes]

    def step(self, state: int, data: bytes) -> int:
        """The state after ``data`` from ``state`` (``dead`` if some byte is not allowed)."""
        columns, classes, dead = self.columns, self.classes, self.dead
        for b in data:
            state = int(columns[state, classes[b]])
            if state == dead:
                break
        return state

    def live_bytes(self, state: int) -> np.ndarray:
        """The bytes (values 0-255) allowed in ``state``, ascending."""
        return np.flatnonzero(self.row(state) != self.dead)

    def reachable(self) -> np.ndarray:
        """The states some text leads to from the initial state, ascending (the dead state not among them)."""
        seen = np.zeros(self.columns.shape[0], dtype=bool)
        seen[self.dead] = True
        frontier = np.array([self.initial])
        while frontier.size:
            seen[frontier] = True
            nxt = np.unique(self.columns[frontier])
            frontier = nxt[~seen[nxt]]
        seen[self.dead] = False
        return np.flatnonzero(seen)

    def fullmatch(self, data: bytes) -> bool:
        s = self.step(self.initial, data)
        return s != self.dead and bool(self.final[s])

    def byte_distances(self, usable: np.ndarray) -> np.ndarray:
        """[S + 1] int32: fewest bytes from each state to a complete value, moving only by the bytes
        where ``usable`` [256] is True (INT32 max // 2 where the end cannot be reached that way).
        Breadth-first backwards from the final states, a level at a time over the reversed edges."""
        inf = np.iinfo(np.int32).max // 2
        n, dead = self.columns.shape[0], self.dead
        dst = self.columns[:, np.unique(self.classes[np.flatnonzero(usable)])]  # [S + 1, k]
        src = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], dst.shape)
        keep = (dst != dead) & (src != dead)
        pairs = np.unique(dst[keep].astype(np.int64) * n + src[keep])  # sorted by target, duplicates merged
        into, come_from = pairs // n, pairs % n
        starts = np.searchsorted(into, np.arange(n + 1))  # CSR over targets
        dist = np.full(n, inf, dtype=np.int32)
        frontier = np.flatnonzero(self.final)
        dist[frontier] = 0
        level = 0
        while frontier.size:
            level += 1
            lo, hi = starts[frontier], starts[frontier + 1]
            counts = hi - lo
            if not counts.sum():
                break
            idx = concat_ranges(lo, counts)  # [E] edge rows
            prev = np.unique(come_from[idx])
            prev = prev[dist[prev] == inf]
            dist[prev] = level
            frontier = prev
        return dist


def byte_classes(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class of each byte [256] uint8, the distinct columns [S + 1, C]) of a DFA table: bytes whose
    columns are equal in every state are one class. Columns are grouped by a random projection,
    and the grouping is checked exactly."""
    keys = np.random.default_rng(0).random(table.shape[0]) @ table  # [256]
    _, firsts, classes = np.unique(keys, return_index=True, return_inverse=True)
    columns = np.ascontiguousarray(table[:, firsts])
    if not np.array_equal(columns[:, classes], table):  # two columns' keys collided: no classes then
        return np.arange(256, dtype=np.uint8), table
    return classes.astype(np.uint8), columns


def minimized(dfa: ByteDFA) -> ByteDFA:
    """``dfa`` with the states no text tells apart merged, by our C++ builder (``dfa`` itself when it is not
    available, when nothing merges, or when the DFA is too large to minimize)."""
    lib = native_dfa.library()
    if lib is None:
        return dfa
    got = native_dfa.minimize_table(lib, dfa.table, dfa.final, dfa.classes)
    if got is None or got[1] == dfa.columns.shape[0] or got[0][dfa.initial] == got[1] - 1:
        return dfa
    block_of, m = got
    rows = np.empty(m, dtype=np.int64)  # a state of each block
    rows[block_of] = np.arange(block_of.size)
    return ByteDFA.from_columns(block_of[dfa.columns[rows]], dfa.classes, dfa.final[rows], int(block_of[dfa.initial]))


def refine_classes(partitions: list[np.ndarray]) -> np.ndarray:
    """The coarsest byte classes within every one of ``partitions`` [256] each, numbered 0..C-1: a DFA made
    from DFAs, byte by byte alike (a splice, an intersection), has equal columns on these."""
    keys = np.stack(partitions)  # [k, 256]: a byte's class in each
    order = np.lexsort(keys[::-1])  # bytes with equal keys side by side
    ordered = keys[:, order]
    starts = np.ones(256, dtype=bool)  # where a new combination of classes begins
    starts[1:] = (ordered[:, 1:] != ordered[:, :-1]).any(axis=0)
    classes = np.empty(256, dtype=np.uint8)
    classes[order] = np.cumsum(starts) - 1
    return classes


def _from_columns(columns: np.ndarray, classes: np.ndarray, final: np.ndarray, initial: int) -> ByteDFA:
    return ByteDFA.from_columns(columns, classes, final, initial)


def _narrow(columns: np.ndarray) -> np.ndarray:
    """``columns`` as uint16 where its state ids fit (rows <= 65,536), else int32, contiguous. Arithmetic on
    state ids (offsets, products) widens them first: 16-bit sums would wrap."""
    return np.ascontiguousarray(columns, dtype=np.uint16 if columns.shape[0] <= 1 << 16 else np.int32)


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``arange(starts[i], starts[i] + counts[i])`` for every i, concatenated, without a Python loop."""
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


@functools.cache
def _byte_vocabulary():
    from outlines_core import Vocabulary

    # bytes 0-255 (not 0xF4, the sentinel's lead byte), the sentinel (256); the EOS id is a placeholder (257)
    by_bytes = {bytes([b]): [b] for b in range(256) if b != 0xF4}
    by_bytes[SENTINEL.encode()] = [SENTINEL_ID]
    return Vocabulary(SENTINEL_ID + 1, by_bytes)


def regex_to_dfa(regex: str) -> ByteDFA:
    """Build the byte DFA of ``regex`` (outlines-core's dialect) in this process: with our C++ builder
    (`native_dfa`), else with outlines-core."""
    lib = native_dfa.library()
    built = native_dfa.compile_regex(lib, regex) if lib is not None else None
    if built is not None:
        return ByteDFA.from_columns(built[0], built[2], built[1], 0)
    if quick.limits() is not None:  # outlines-core cannot be stopped: that build is a worker's
        raise quick.QuickLimitExceeded("a regex only outlines-core builds")
    return outlines_regex_to_dfa(regex)


def outlines_regex_to_dfa(regex: str) -> ByteDFA:
    """The byte DFA of ``regex`` built by outlines-core (its ``Index`` over the bytes)."""
    from outlines_core import Index

    try:
        index = Index(f"(?:{regex}){_SENTINEL_RE}", _byte_vocabulary())
    except Exception as e:  # noqa: BLE001 - outlines-core raises its own (Rust) error types
        raise GrammarCompileError(f"the schema's regex could not be compiled: {e}") from None
    transitions = index.get_transitions()  # {state: {byte: state}}
    rows = list(transitions.values())
    counts = np.fromiter(map(len, rows), np.int64, len(rows))
    total = int(counts.sum())
    src = np.repeat(np.fromiter(transitions.keys(), np.int64, len(rows)), counts)
    col = np.fromiter(itertools.chain.from_iterable(rows), np.int64, total)
    nxt = np.fromiter(itertools.chain.from_iterable(r.values() for r in rows), np.int64, total)
    states = np.unique(np.concatenate([src, nxt, [index.get_initial_state()]]))
    n = len(states)  # the dead state's row
    src = np.searchsorted(states, src)
    text = col < 256  # not the sentinel (final[] says where it leads to acceptance) nor the EOS placeholder
    table = np.full((n + 1, 256), n, dtype=np.int32)
    table[src[text], col[text]] = np.searchsorted(states, nxt[text])
    accepting = np.isin(nxt, np.fromiter(index.get_final_states(), np.int64))
    final = np.zeros(n + 1, dtype=bool)
    final[src[(col == SENTINEL_ID) & accepting]] = True
    return ByteDFA(table, final, int(np.searchsorted(states, index.get_initial_state())))


def build_byte_dfa(regex: str, timeout_s: float | None) -> ByteDFA:
    """The byte DFA of ``regex`` under a compile slot (and in a bounded child process when
    ``timeout_s`` is given); GrammarCompileError on failure or timeout, GrammarBusyError when no
    compile slot is free."""
    return run_bounded(functools.partial(regex_to_dfa, regex), timeout_s)


class ByteAutomaton:
    """The regex as a byte-level automaton: exact full-match tests of text against the same DFA
    a compiled grammar runs."""

    def __init__(self, regex: str, timeout_s: float | None = None):
        self.dfa = build_byte_dfa(regex, timeout_s)

    def fullmatch(self, text: str | bytes) -> bool:
        return self.dfa.fullmatch(text.encode("utf-8") if isinstance(text, str) else text)
