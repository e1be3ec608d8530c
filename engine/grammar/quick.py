"""The first attempt at a compile, in the caller's own process under tight limits (`attempt`).

Most tool schemas compile in a millisecond or two, less than a round trip to a compile worker
(`automaton.CompileWorkers`) costs. So the compiler first runs the whole schema -> DFA chain here,
bounded by `QuickLimits`: a short time, few states per automaton, a short regex. Every step that
could grow checks them and raises `QuickLimitExceeded` when one is passed; the compiler then gives
the schema to a worker, whose limits are the real ones (time, memory, size) and whose error messages
name the part that blew up.

An attempt's outcome is the worker's outcome whenever the attempt finishes: no limit here turns into
a verdict about the schema (an overlap assumed, a keyword refused), only into QuickLimitExceeded.
While it runs it holds the GIL for at most about ``seconds`` in Python (the C++ DFA builder releases
it), so a busy server's decode steps wait at most that long for it.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


class QuickLimitExceeded(Exception):
    """The in-process attempt passed one of its limits: compile in a worker instead. Not a
    GrammarCompileError, so no step mistakes it for a verdict about the schema."""


@dataclass(frozen=True)
class QuickLimits:
    deadline: float  # time.perf_counter() time
    max_states: int = 20_000  # per automaton: 20 MB of dense rows at most
    max_nfa_states: int = 200_000
    max_regex_chars: int = 200_000

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()


_local = threading.local()


def limits() -> QuickLimits | None:
    """The limits of the attempt this thread runs, or None outside one."""
    return getattr(_local, "limits", None)


@contextmanager
def attempt(seconds: float, **sizes: int) -> Iterator[QuickLimits]:
    """Run the body as an in-process attempt of at most ``seconds`` (and ``sizes``: QuickLimits' other
    fields, where not their defaults)."""
    outer = limits()
    _local.limits = QuickLimits(time.perf_counter() + seconds, **sizes)
    try:
        yield _local.limits
    finally:
        _local.limits = outer


def check(what: str = "compile") -> None:
    """Raise QuickLimitExceeded when this thread's attempt is past its time."""
    lim = limits()
    if lim is not None and time.perf_counter() > lim.deadline:
        raise QuickLimitExceeded(f"the {what} passed the in-process attempt's time")


def check_states(n: int, what: str) -> None:
    """Raise QuickLimitExceeded when an automaton of ``n`` states passes this thread's attempt's limit
    (or its time)."""
    lim = limits()
    if lim is not None and (n > lim.max_states or time.perf_counter() > lim.deadline):
        raise QuickLimitExceeded(f"{what} passed the in-process attempt's limits ({n} states)")
