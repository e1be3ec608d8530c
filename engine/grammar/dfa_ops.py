"""Operations on byte DFAs that a regex cannot say: intersection (a ``pattern`` and a length limit on
the same string), and splicing a DFA into another where a placeholder byte stands for it.

Placeholders are the control bytes 0x01-0x1F: compact JSON never holds them raw (a string escapes
them), so no regex the schema compiles to matches one, and each can stand for one hole.
"""
from __future__ import annotations

import re

import numpy as np

from . import native_dfa, quick
from .byte_dfa import ByteDFA, refine_classes
from .errors import AutomatonTooLargeError, GrammarCompileError

PLACEHOLDERS = range(0x01, 0x20)
_PLACEHOLDER_RE = re.compile(r"\\x(?:0[1-9A-F]|1[0-9A-F])")  # as placeholder_regex writes them (no braces)


def placeholder_regex(byte: int) -> str:
    r"""The regex of one placeholder byte (other bytes are written ``\x{..}``, so this form is its own)."""
    return f"\\x{byte:02X}"


def has_placeholder(regex: str) -> bool:
    """Whether ``regex`` stands for more than it says (a placeholder for a spliced part)."""
    return bool(_PLACEHOLDER_RE.search(regex))


def placeholders_in(regex: str) -> list[int]:
    """The placeholder bytes ``regex`` holds."""
    return [int(m.group(0)[2:], 16) for m in _PLACEHOLDER_RE.finditer(regex)]


class SpliceError(GrammarCompileError):
    """A part and what surrounds it both go on with the same byte: the splice would not be a DFA."""


MAX_MODULUS = 10_000  # a multiple-of-k automaton has k + 3 states of 1 KB each


def multiples_dfa(k: int) -> ByteDFA:
    """The DFA of the integers (JSON text ``-?(0|[1-9][0-9]*)``) that are multiples of ``k``: it keeps the
    remainder modulo k of the digits read so far. Any k, any range: a regex of it would be huge."""
    if not 1 <= k <= MAX_MODULUS:
        raise GrammarCompileError(f"multipleOf {k}: automata are built up to {MAX_MODULUS}")
    start, minus, zero, rem = 0, 1, 2, 3  # rem + r: a number whose digits so far leave remainder r
    n = rem + k
    table = np.full((n + 1, 256), n, dtype=np.int32)
    digits = np.arange(10)
    table[start, ord("-")] = minus
    table[[start, minus], ord("0")] = zero
    table[start, ord("1"):ord("9") + 1] = rem + digits[1:] % k
    table[minus, ord("1"):ord("9") + 1] = rem + digits[1:] % k
    r = np.arange(k)[:, None]  # [k, 1]
    table[rem:rem + k, ord("0"):ord("9") + 1] = rem + (10 * r + digits[None, :]) % k  # [k, 10]
    final = np.zeros(n + 1, dtype=bool)
    final[[zero, rem]] = True
    classes = np.zeros(256, dtype=np.uint8)  # other bytes, "-", each digit
    classes[ord("-")] = 1
    classes[ord("0"):ord("9") + 1] = np.arange(2, 12)
    return ByteDFA(table, final, start, classes)


# the bytes that stand for one character of a JSON string each: printable ASCII but the quote and backslash
ONE_BYTE_CHARS = np.array([b for b in range(0x20, 0x7F) if b not in (0x22, 0x5C)])


def counted_bytes_dfa(alphabet: np.ndarray, mn: int, mx: int | None) -> ByteDFA:
    """The DFA of ``mn`` to ``mx`` (None: no limit) bytes from ``alphabet`` [n] (byte values): a counter, one
    state per count. A string's length limit where the rest of its constraints only admit one-byte characters
    (`ONE_BYTE_CHARS`), so that bytes are characters: the character-level counter has ~14 states a count
    (UTF-8 continuations, escapes), 140,000 for 10,000 characters."""
    last = mn if mx is None else mx  # the counts are 0..last; without a limit the last one loops
    n = last + 1
    table = np.full((n + 1, 256), n, dtype=np.int32)
    if last:
        table[np.arange(last)[:, None], alphabet[None, :]] = np.arange(1, n)[:, None]
    if mx is None:
        table[last, alphabet] = last
    final = np.zeros(n + 1, dtype=bool)
    final[mn:n] = True
    classes = np.zeros(256, dtype=np.uint8)
    classes[alphabet] = 1
    return ByteDFA(table, final, 0, classes)


MAX_UNIQUE_STATES = 50_000  # a unique-items automaton remembers which values were used: 2^n times the values' text


def unique_items_dfa(texts: tuple[str, ...], mn: int, mx: int | None) -> ByteDFA:
    """The DFA of compact JSON arrays of distinct values from ``texts`` (each value's one JSON text; no
    two equal as JSON), ``mn`` to ``mx`` items. A state is the set of values used so far and the
    position in the trie of the values' texts (the trie's root: a value may start)."""
    values = [t.encode("utf-8") for t in texts]
    mx = len(values) if mx is None else min(mx, len(values))
    kids: list[dict[int, int]] = [{}]
    ends, below = [-1], [0]  # the value ending at each trie node; the values under it (bit mask)
    for i, text in enumerate(values):
        node = 0
        below[0] |= 1 << i
        for byte in text:
            if byte not in kids[node]:
                kids[node][byte] = len(kids)
                kids.append({}), ends.append(-1), below.append(0)
            node = kids[node][byte]
            below[node] |= 1 << i
        ends[node] = i
    start, end = ("start",), ("end",)
    ids: dict[tuple, int] = {start: 0, end: 1}
    todo, edges = [start, (0, 0)], []  # (0, 0): after "[", nothing used yet
    ids[(0, 0)] = 2
    edges.append((0, ord("["), 2))
    i = 1
    while i < len(todo):
        key = todo[i]
        i += 1
        used, node = key
        src = ids[key]
        out: list[tuple[int, tuple]] = []
        if used == 0 and node == 0 and mn == 0:
            out.append((ord("]"), end))
        out += [(b, (used, c)) for b, c in kids[node].items() if below[c] & ~used]
        if node and ends[node] >= 0 and not used >> ends[node] & 1:
            now = used | 1 << ends[node]
            count = bin(now).count("1")
            if count < mx:
                out.append((ord(","), (now, 0)))
            if mn <= count <= mx:
                out.append((ord("]"), end))
        for byte, nxt in out:
            if nxt not in ids:
                if len(ids) % 256 == 0:
                    quick.check_states(len(ids), "a uniqueItems automaton")
                if len(ids) >= MAX_UNIQUE_STATES:
                    raise AutomatonTooLargeError(f"uniqueItems over {len(values)} values passed {MAX_UNIQUE_STATES} states")
                ids[nxt] = len(ids)
                todo.append(nxt)
            edges.append((src, byte, ids[nxt]))
    n = len(ids)
    table = np.full((n + 1, 256), n, dtype=np.int32)
    src, col, dst = (np.array(x, dtype=np.int64) for x in zip(*edges))
    table[src, col] = dst
    final = np.zeros(n + 1, dtype=bool)
    final[ids[end]] = True
    return ByteDFA(table, final, 0)


def intersect(a: ByteDFA, b: ByteDFA, max_states: int = 200_000) -> ByteDFA:
    """The DFA of the texts both ``a`` and ``b`` match: the reachable pairs of their states (by our C++
    builder where it is available: a pair a few tens of nanoseconds there, ~50 us in the loop below)."""
    lib = native_dfa.library()
    if lib is not None:
        columns, final, classes = native_dfa.intersect_columns(lib, a, b, refine_classes([a.classes, b.classes]),
                                                               max_states)
        return ByteDFA.from_columns(columns, classes, final, 0)
    ids = {(a.initial, b.initial): 0}
    pairs = [(a.initial, b.initial)]
    rows: list[np.ndarray] = []
    i = 0
    while i < len(pairs):
        sa, sb = pairs[i]
        na, nb = a.row(sa), b.row(sb)  # [256] each
        live = np.flatnonzero((na != a.dead) & (nb != b.dead))
        row = np.full(256, -1, dtype=np.int64)
        for byte, key in zip(live.tolist(), zip(na[live].tolist(), nb[live].tolist())):
            j = ids.get(key)
            if j is None:
                if len(pairs) % 256 == 0:
                    quick.check_states(len(pairs), "an intersection")
                if len(pairs) >= max_states:
                    raise AutomatonTooLargeError(f"intersecting two automata passed {max_states} states")
                j = ids[key] = len(pairs)
                pairs.append(key)
            row[byte] = j
        rows.append(row)
        i += 1
    n = len(pairs)
    table = np.full((n + 1, 256), n, dtype=np.int32)
    table[:n] = np.where(np.stack(rows) >= 0, np.stack(rows), n)
    final = np.zeros(n + 1, dtype=bool)
    final[:n] = [bool(a.final[x]) and bool(b.final[y]) for x, y in pairs]
    return ByteDFA(table, final, 0, refine_classes([a.classes, b.classes]))


def splice(skeleton: ByteDFA, holes: dict[int, ByteDFA]) -> ByteDFA:
    """Replace each placeholder transition ``s --p--> t`` of ``skeleton`` by the DFA ``holes[p]``: from
    ``s`` the hole's first bytes lead into a copy of it, and its final states go on as ``t`` does (a
    hole that matches the empty text also lets ``s`` go on as ``t`` does).

    Exact only where no choice is left open between the hole and what surrounds it, which is checked:
    at ``s`` the hole's first bytes may not be the skeleton's other bytes, and at a final state of the
    hole its next bytes may not be ``t``'s. GrammarCompileError otherwise (a DFA would have to be built
    from the union, which is the regex compile's job)."""
    dead = skeleton.dead
    size = dead
    wiring: list[tuple[int, int, ByteDFA, int]] = []  # (s, t, hole, offset of its copy)
    copies: list[tuple[int, ByteDFA]] = []  # one copy of a hole per distinct t it leads to
    for p, hole in holes.items():
        by_target: dict[int, int] = {}
        into = skeleton.columns[:dead, skeleton.classes[p]]  # [S] where byte p leads
        for src in np.flatnonzero(into != dead).tolist():
            t = int(into[src])
            if t not in by_target:
                by_target[t] = size
                copies.append((size, hole))
                size += hole.dead
            wiring.append((src, t, hole, by_target[t]))
    quick.check_states(size, "a splice")
    # the result's byte classes: within every part's, each placeholder a class of its own (its column is
    # all dead now); the table is made in them, [size + 1, C], each part's columns picked by a byte of each
    alone = np.zeros(256, dtype=np.uint8)
    alone[list(holes)] = np.arange(1, len(holes) + 1)
    classes = refine_classes([skeleton.classes, alone, *(hole.classes for hole in holes.values())])
    reps = np.unique(classes, return_index=True)[1]  # [C] a byte of each class
    out = np.empty((size + 1, reps.size), dtype=np.int32)
    out[size] = size  # the new dead state
    _place(skeleton, out, 0, size, reps)
    for p in holes:
        out[:dead, classes[p]] = size  # the placeholder itself is never text
    for offset, hole in copies:
        _place(hole, out, offset, size, reps)
    final = np.zeros(size + 1, dtype=bool)
    final[:dead] = skeleton.final[:dead]
    for src, _, hole, offset in wiring:  # into each hole first: a state after a hole may start another
        first = hole.columns[hole.initial, hole.classes[reps]].astype(np.int64)  # [C]
        enter = np.flatnonzero(first != hole.dead)
        _join(out[src], enter, first[enter] + offset, size)
    for src, t, hole, offset in wiring:
        ends = np.flatnonzero(hole.final[:hole.dead]) + offset
        if hole.final[hole.initial]:
            ends = np.append(ends, src)
        for f in ends.tolist():
            go_on = np.flatnonzero(out[t] != size)
            _join(out[f], go_on, out[t, go_on], size)
            final[f] |= skeleton.final[t]
    return ByteDFA.from_columns(out, classes, final, skeleton.initial)


def _place(block: ByteDFA, out: np.ndarray, offset: int, new_dead: int, reps: np.ndarray) -> None:
    """Write ``block``'s rows into ``out`` [*, C] from row ``offset``, in the classes of the bytes ``reps`` [C],
    its states renumbered from there and its dead state made ``new_dead``."""
    rows, dst = np.take(block.columns[:block.dead], block.classes[reps], axis=1), out[offset:offset + block.dead]
    np.add(rows, offset, out=dst, dtype=np.int32)
    np.putmask(dst, rows == block.dead, new_dead)


def _join(row: np.ndarray, on: np.ndarray, to: np.ndarray, dead: int) -> None:
    """Add the transitions ``on`` -> ``to`` to ``row`` (in place); GrammarCompileError where it has its own."""
    clash = (row[on] != dead) & (row[on] != to)
    if clash.any():
        raise SpliceError("a spliced part and what surrounds it both go on with the same byte")
    row[on] = to
