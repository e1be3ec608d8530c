"""What a compile child runs: schema -> regex -> byte DFA, pickled. Kept apart from compiler.py (and
free of torch) so the compile workers that fork these children stay small: forking a process that
has imported torch costs ~10 ms more."""
from __future__ import annotations

import pickle

from .byte_dfa import regex_to_dfa
from .schema_regex import schema_to_regex


def compile_schema(schema: dict, lenient: bool, timeout_s: float | None) -> bytes:
    """The pickled (regex, unenforced keywords, byte DFA) of ``schema``: a module function of plain
    arguments, so a compile process can be handed it (see `automaton.run_bounded`). No token appears
    here: a state's allowed tokens are computed when a matcher reaches it."""
    regex, unenforced = schema_to_regex(schema, lenient=lenient, timeout_s=timeout_s)
    return pickle.dumps((regex, unenforced, regex_to_dfa(regex)), protocol=pickle.HIGHEST_PROTOCOL)


def warm_up() -> None:
    """Fill the caches every compile would otherwise build again in its own forked process (the
    Unicode sets behind a pattern's \\d \\w \\s, outlines-core's byte vocabulary): a compile worker
    runs this once before it forks any."""
    regex, _ = schema_to_regex({"type": "string", "pattern": r"^[\w\s]\d\D\W\S$"}, timeout_s=None)
    regex_to_dfa(regex)
