"""What a compile child runs: schema -> regex -> byte DFA, pickled. Kept apart from compiler.py (and
free of torch) so the compile workers that fork these children stay small: forking a process that
has imported torch costs ~10 ms more."""
from __future__ import annotations

import pickle
from typing import Any

from .byte_dfa import ByteDFA, regex_to_dfa
from .dfa_ops import intersect, multiples_dfa, splice
from .schema_regex import schema_to_parts, schema_to_regex


def schema_to_dfa(schema: Any, lenient: bool = False, timeout_s: float | None = None) -> tuple[str, list[str], ByteDFA]:
    """(regex, unenforced keywords, byte DFA) of ``schema``: the regex's DFA with the parts it leaves
    to automata (intersections) spliced in where their placeholders stand."""
    regex, unenforced, holes = schema_to_parts(schema, lenient=lenient, timeout_s=timeout_s)
    dfa = regex_to_dfa(regex)
    if holes:
        parts = {}
        for byte, pieces in holes.items():
            dfas = [multiples_dfa(p[1]) if isinstance(p, tuple) else regex_to_dfa(p) for p in pieces]
            part = dfas[0]
            for more in dfas[1:]:
                part = intersect(part, more)
            parts[byte] = part
        dfa = splice(dfa, parts)
    return regex, unenforced, dfa


def compile_schema(schema: dict, lenient: bool, timeout_s: float | None) -> bytes:
    """The pickled `schema_to_dfa` of ``schema``: a module function of plain arguments, so a compile
    process can be handed it (see `automaton.run_bounded`). No token appears here: a state's allowed
    tokens are computed when a matcher reaches it."""
    return pickle.dumps(schema_to_dfa(schema, lenient, timeout_s), protocol=pickle.HIGHEST_PROTOCOL)


def warm_up() -> None:
    """Fill the caches every compile would otherwise build again in its own forked process (the
    Unicode sets behind a pattern's \\d \\w \\s, outlines-core's byte vocabulary): a compile worker
    runs this once before it forks any."""
    regex, _ = schema_to_regex({"type": "string", "pattern": r"^[\w\s]\d\D\W\S$"}, timeout_s=None)
    regex_to_dfa(regex)
