"""What a compile runs in a compile worker (or first in the caller's process, see quick.py): schema ->
regex -> byte DFA, pickled. Kept apart from compiler.py (and free of torch) so the workers stay small:
forking a process that has imported torch cost ~10 ms more, and a worker's import time is paid again
whenever one starts.

The parts a regex leaves to automata (see schema_to_parts) are built here and kept, least recently
used first out, within ``_PARTS_BYTES``: a tool's arguments, a part of its own, compile once per process
however many turn grammars hold the tool.
"""
from __future__ import annotations

import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from . import quick
from .byte_dfa import ByteDFA, minimized, regex_to_dfa
from .dfa_ops import (ONE_BYTE_CHARS, SpliceError, counted_bytes_dfa, intersect, multiples_dfa, placeholders_in, splice,
                      unique_items_dfa)
from .errors import AutomatonTooLargeError, GrammarCompileError, UnsupportedSchemaError
from .regex_util import STRING_CHAR, rep
from .schema_regex import schema_to_parts, schema_to_regex

_PARTS: OrderedDict[tuple, ByteDFA] = OrderedDict()
_PARTS_BYTES = 64 << 20
_PARTS_LOCK = threading.Lock()  # in-process attempts (quick.py) may run in several threads at once


def schema_to_dfa(schema: Any, lenient: bool = False, timeout_s: float | None = None) -> tuple[str, list[str], ByteDFA]:
    """(regex, unenforced keywords, byte DFA) of ``schema``: the regex's DFA with the parts it leaves
    to automata (intersections, objects in properties and array items) spliced in where their
    placeholders stand. AutomatonTooLargeError names the part of the schema that is too large alone.

    Both stop at 90% of ``timeout_s``, so that their message, which names the schema part, comes back
    before the caller's time limit kills the compile without one."""
    end = None if timeout_s is None else time.monotonic() + 0.9 * timeout_s
    try:
        return _whole_dfa(schema, lenient, None if timeout_s is None else 0.9 * timeout_s)
    except AutomatonTooLargeError as e:
        if quick.limits() is not None:  # naming the part is the worker's, under its own limits
            raise
        deadline = time.monotonic() + _BLAME_S if end is None else min(end, time.monotonic() + _BLAME_S)
        where = _too_large_part(schema, schema, "", lenient, deadline)
        if where is None:
            raise
        raise AutomatonTooLargeError(f"{e}; {where or '/'} is too large on its own") from None


# The open grammar (see `Ctx.open_objects`) is tried within these (and half the time), then the closed one
# within the compile's own limits: the keys every object may have besides its named ones can make a
# grammar several times larger than its schema's named parts
_OPEN_LIMITS = {"max_states": 50_000, "max_nfa_states": 500_000, "max_regex_chars": 500_000}
_OPEN_ATTEMPT_S = 10.0  # the open grammar's time where the compile has no limit


def _whole_dfa(schema: Any, lenient: bool, timeout_s: float | None) -> tuple[str, list[str], ByteDFA]:
    if quick.limits() is not None or not _says_nothing_of_other_keys(schema):  # an attempt: its own limits hold
        return _spliced_dfa(schema, lenient, timeout_s, open_objects=True)
    end = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with quick.attempt(_OPEN_ATTEMPT_S if timeout_s is None else timeout_s / 2, **_OPEN_LIMITS):
            return _spliced_dfa(schema, lenient, timeout_s, open_objects=True)
    except (quick.QuickLimitExceeded, AutomatonTooLargeError):
        pass  # where the schema gives no additionalProperties, other keys are then not generated (narrower)
    left = None if end is None else max(end - time.monotonic(), 0.01)
    return _spliced_dfa(schema, lenient, left, open_objects=False)


def _spliced_dfa(schema: Any, lenient: bool, timeout_s: float | None,
                 open_objects: bool) -> tuple[str, list[str], ByteDFA]:
    try:
        return _to_dfa(schema, lenient, timeout_s, split_objects=True, open_objects=open_objects)
    except SpliceError:  # an object part left a choice open where it stands: inline then
        pass
    try:
        return _to_dfa(schema, lenient, timeout_s, split_objects=False, open_objects=open_objects)
    except SpliceError:  # so did a part only an automaton says (two unique-items arrays in one anyOf):
        # without parts, the keywords that need them are refused by name (or left to lenient mode)
        return _to_dfa(schema, lenient, timeout_s, split_objects=False, with_parts=False, open_objects=open_objects)


def _says_nothing_of_other_keys(node: Any) -> bool:
    """Whether some object subschema of ``node`` names properties and gives no additionalProperties."""
    if isinstance(node, list):
        return any(_says_nothing_of_other_keys(v) for v in node)
    if not isinstance(node, dict):
        return False
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        return True
    return any(_says_nothing_of_other_keys(v) for k, v in node.items() if k not in ("enum", "const"))


_BLAME_S = 3.0  # how long a failed compile may look for the part that made it fail


def _too_large_part(root: Any, node: Any, path: str, lenient: bool, deadline: float) -> str | None:
    """The JSON pointer of the deepest subschema under ``node`` whose automaton alone passes the size
    limits (each compiled with the root's definitions), or None when none does on its own."""
    for sub_path, sub in _subschemas(node, path):
        if time.monotonic() > deadline:
            return None
        fragment = sub
        if isinstance(sub, dict) and isinstance(root, dict):  # its $refs still resolve
            fragment = {**{k: root[k] for k in ("definitions", "$defs") if k in root}, **sub}
        try:
            _whole_dfa(fragment, lenient, max(deadline - time.monotonic(), 0.01))
        except AutomatonTooLargeError:
            return _too_large_part(root, sub, sub_path, lenient, deadline) or sub_path
        except (GrammarCompileError, UnsupportedSchemaError):
            continue
    return None


def _subschemas(node: Any, path: str) -> list[tuple[str, Any]]:
    """(JSON pointer, subschema) of the schemas ``node`` applies to its values, then its definitions."""
    if not isinstance(node, dict):
        return []

    def named(key: str) -> list[tuple[str, Any]]:
        subs = node.get(key)
        return [(f"{path}/{key}/{name.replace('~', '~0').replace('/', '~1')}", sub)
                for name, sub in subs.items()] if isinstance(subs, dict) else []

    out = named("properties") + named("patternProperties")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(node.get(key), list):
            out += [(f"{path}/{key}/{i}", sub) for i, sub in enumerate(node[key])]
    for key in ("items", "additionalProperties", "not", "contains"):
        if isinstance(node.get(key), dict):
            out.append((f"{path}/{key}", node[key]))
    return out + named("$defs") + named("definitions")  # last: where a $ref above leads


def _to_dfa(schema: Any, lenient: bool, timeout_s: float | None, split_objects: bool, with_parts: bool = True,
            open_objects: bool = True) -> tuple[str, list[str], ByteDFA]:
    regex, unenforced, holes = schema_to_parts(schema, lenient=lenient, timeout_s=timeout_s, holes=with_parts,
                                               split_objects=split_objects, open_objects=open_objects)
    parts: dict[int, ByteDFA] = {}
    for byte in sorted(holes):  # a part holds only placeholders made before it (smaller bytes)
        inner = [b for piece in holes[byte] if isinstance(piece, str) for b in placeholders_in(piece)]
        key = (tuple(holes[byte]), tuple((b, tuple(holes[b])) for b in sorted(set(inner))))
        parts[byte] = _part(key, holes[byte], {b: parts[b] for b in inner})
    dfa = regex_to_dfa(regex)
    return regex, unenforced, splice(dfa, parts) if parts else dfa


def _part(key: tuple, pieces: list, inner: dict[int, ByteDFA]) -> ByteDFA:
    """The DFA of the intersection of ``pieces`` (regexes, ("multiple_of", k) or ("unique_items", ...)) with ``inner`` parts
    spliced in; kept under ``key``."""
    with _PARTS_LOCK:
        hit = _PARTS.get(key)
        if hit is not None:
            _PARTS.move_to_end(key)
            return hit
    lengths = [p for p in pieces if isinstance(p, tuple) and p[0] == "length"]  # ("length", minLength, maxLength)
    dfas = [_piece_dfa(p) for p in pieces if p not in lengths]
    dfas += [_length_dfa(*p[1:], dfas) for p in lengths]  # after the rest, whose bytes they may count
    part = dfas[0]
    for more in dfas[1:]:
        part = intersect(part, more)
    if len(dfas) > 1:  # a product automaton: often far from minimal (splices of minimal parts are close to it)
        part = minimized(part)
    if inner:
        part = splice(part, inner)
    with _PARTS_LOCK:
        _PARTS[key] = part
        total = sum(p.nbytes for p in _PARTS.values())
        while len(_PARTS) > 1 and total > _PARTS_BYTES:
            total -= _PARTS.popitem(last=False)[1].nbytes
    return part


def _length_dfa(mn: int, mx: int | None, others: list[ByteDFA]) -> ByteDFA:
    """A string's length limits as an automaton: a counter of bytes where the other constraints on the
    string admit only one-byte characters, else of any JSON string character."""
    used = np.zeros(256, dtype=bool)
    for dfa in others:
        states = dfa.reachable()
        used |= (dfa.columns[states] != dfa.dead).any(axis=0)[dfa.classes]
    alphabet = np.flatnonzero(used)
    if others and np.isin(alphabet, ONE_BYTE_CHARS).all():
        return counted_bytes_dfa(alphabet, mn, mx)
    return regex_to_dfa(rep(STRING_CHAR, mn, mx))


def _piece_dfa(piece: str | tuple) -> ByteDFA:
    if isinstance(piece, str):
        return regex_to_dfa(piece)
    if piece[0] == "multiple_of":
        return multiples_dfa(piece[1])
    return unique_items_dfa(*piece[1:])  # ("unique_items", texts, minItems, maxItems)


def compile_schema(schema: dict, lenient: bool, timeout_s: float | None) -> bytes:
    """The pickled `schema_to_dfa` of ``schema``: a module function of plain arguments, so a compile
    process can be handed it (see `automaton.run_bounded`). No token appears here: a state's allowed
    tokens are computed when a matcher reaches it."""
    return pickle.dumps(schema_to_dfa(schema, lenient, timeout_s), protocol=pickle.HIGHEST_PROTOCOL)


def warm_up() -> None:
    """Fill the caches a worker's first compile would otherwise build (the Unicode sets behind a
    pattern's \\d \\w \\s, the DFA builder, jsonschema), so the children it forks for nested steps
    inherit them: a compile worker runs this once when it starts."""
    import jsonschema  # noqa: F401 - enum values are checked against their schema with it (~0.1 s to import)

    regex, _ = schema_to_regex({"type": "string", "pattern": r"^[\w\s]\d\D\W\S$"}, timeout_s=None)
    regex_to_dfa(regex)
