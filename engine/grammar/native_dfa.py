"""The regex -> byte DFA compiler in C++ (``regex_dfa.cpp``): built on first use with the system's C++
compiler into ``cache_base()/native``, loaded with ctypes (the compile workers run without torch, so
it is not a torch extension). `byte_dfa.regex_to_dfa` uses it when it is there and falls back to
outlines-core where it cannot be built (no compiler) or a regex holds syntax it does not parse.

Set ``AGENTRT_GRAMMAR_NATIVE=0`` to build every DFA with outlines-core instead.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from . import quick
from .disk_cache import cache_base
from .errors import AutomatonTooLargeError, GrammarCompileError

SOURCE = Path(__file__).with_name("regex_dfa.cpp")
# A DFA state's dense row is 1 KB: 400k states are 400 MB, a large part of a compile's memory share
# ($AGENTRT_GRAMMAR_COMPILE_MEMORY_MB, 2 GB for all compiles at once by default) beside the regex's
# NFA and the parts spliced around it. $AGENTRT_GRAMMAR_MAX_STATES moves it; the memory cap still holds.
MAX_STATES = 400_000
MAX_NFA_STATES = 2_000_000
_UNSUPPORTED, _TOO_LARGE, _NO_MEMORY = 1, 2, 3
log = logging.getLogger("agentrt.grammar")


def library_path() -> Path:
    """Where this source's build lives (named by its hash: an edited source is built anew)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return Path(cache_base()) / "native" / f"regex_dfa-{digest}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded compiler, built first if this source has not been built yet (a few seconds, once
    per machine; concurrent processes wait for one build); None where it cannot be had."""
    if os.environ.get("AGENTRT_GRAMMAR_NATIVE", "1") == "0":
        return None
    path = library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the grammar's C++ DFA builder is not available (%s); using outlines-core", e)
        return None
    lib.agentrt_regex_dfa.restype = ctypes.c_void_p
    lib.agentrt_regex_dfa.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double]
    for name, restype in [("status", ctypes.c_int), ("message", ctypes.c_char_p), ("states", ctypes.c_int64)]:
        fn = getattr(lib, f"agentrt_regex_dfa_{name}")
        fn.restype, fn.argtypes = restype, [ctypes.c_void_p]
    lib.agentrt_regex_dfa_nclasses.restype, lib.agentrt_regex_dfa_nclasses.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    lib.agentrt_regex_dfa_columns.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.agentrt_regex_dfa_classes.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.agentrt_regex_dfa_free.argtypes = [ctypes.c_void_p]
    lib.agentrt_dfa_intersect.restype = ctypes.c_void_p
    lib.agentrt_dfa_intersect.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double]
    lib.agentrt_dfa_minimize.restype = ctypes.c_int32
    lib.agentrt_dfa_minimize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_void_p]
    lib.agentrt_token_walk.restype = ctypes.c_int64
    lib.agentrt_token_walk.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int64, *[ctypes.c_void_p] * 9, ctypes.c_int64, ctypes.c_int32,
                                       ctypes.c_int64, *[ctypes.c_void_p] * 3]
    return lib


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then use its build
        if path.exists():
            return
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise OSError("no C++ compiler (set $CXX)")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)


def compile_regex(lib: ctypes.CDLL, regex: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(columns [S + 1, C] int32, one per byte class, with row S the dead state, final [S + 1] bool, each
    byte's class [256] uint8, values 0..C-1) of ``regex``'s minimal DFA, initial state 0; None when
    the regex holds syntax this builder does not parse. GrammarCompileError when the automaton passes
    its size limits, MemoryError when memory runs out. Within a `quick.attempt`, its smaller limits (and
    its time) bound the build, and passing one raises QuickLimitExceeded."""
    data = regex.encode("utf-8")
    max_states, max_seconds = _bounds(int(os.environ.get("AGENTRT_GRAMMAR_MAX_STATES") or MAX_STATES))
    max_nfa_states = MAX_NFA_STATES
    attempt = quick.limits()
    if attempt is not None:
        if len(data) > attempt.max_regex_chars:
            raise quick.QuickLimitExceeded(f"a {len(data):,}-byte regex")
        max_nfa_states = attempt.max_nfa_states
    handle = lib.agentrt_regex_dfa(data, len(data), max_states, max_nfa_states, max_seconds)
    return _read(lib, handle, "building the regex's DFA", attempt is not None)


def intersect_columns(lib: ctypes.CDLL, a: Any, b: Any, classes: np.ndarray,
                      max_states: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns, final, classes) as `compile_regex` gives them, of the reachable product of the `ByteDFA`s
    ``a`` and ``b`` in the byte ``classes`` [256] (values 0..C-1, within both DFAs' own); initial state 0,
    not minimized. AutomatonTooLargeError past ``max_states``; within a `quick.attempt`, its limits bound
    it as they do a regex's build."""
    max_states, max_seconds = _bounds(max_states)
    reps = np.unique(classes, return_index=True)[1]  # [C] a byte of each class
    sides = [(np.ascontiguousarray(x.columns, dtype=np.int32), np.ascontiguousarray(x.final, dtype=np.uint8),
              np.ascontiguousarray(x.classes[reps], dtype=np.int32)) for x in (a, b)]
    (ca, fa, map_a), (cb, fb, map_b) = sides
    classes = np.ascontiguousarray(classes, dtype=np.uint8)
    handle = lib.agentrt_dfa_intersect(ca.ctypes.data, fa.ctypes.data, ca.shape[0], ca.shape[1], a.initial,
                                       cb.ctypes.data, fb.ctypes.data, cb.shape[0], cb.shape[1], b.initial,
                                       classes.ctypes.data, map_a.ctypes.data, map_b.ctypes.data, max_states,
                                       max_seconds)
    return _read(lib, handle, "intersecting two automata", quick.limits() is not None)  # type: ignore[return-value]


def _bounds(max_states: int) -> tuple[int, float]:
    """(state limit, time limit in seconds, 0 for none) of a C++ build: within a `quick.attempt`, its own."""
    attempt = quick.limits()
    if attempt is None:
        return max_states, 0.0
    return min(max_states, attempt.max_states), max(attempt.seconds_left(), 1e-4)


def _read(lib: ctypes.CDLL, handle: int | None, what: str, in_attempt: bool):
    """The DFA of a builder's result ``handle`` (freed here), or None for syntax it does not parse; its
    failures raised as `compile_regex` says."""
    if not handle:
        raise MemoryError(what)
    try:
        status = lib.agentrt_regex_dfa_status(handle)
        if status == _UNSUPPORTED:
            return None
        if in_attempt and status in (_TOO_LARGE, _NO_MEMORY):
            raise quick.QuickLimitExceeded(lib.agentrt_regex_dfa_message(handle).decode())
        if status == _NO_MEMORY:  # the compile process reports its memory cap (automaton.run_job)
            raise MemoryError(what)
        if status:
            why = lib.agentrt_regex_dfa_message(handle).decode()
            if status == _TOO_LARGE:
                raise AutomatonTooLargeError(f"the schema's grammar is too large to compile: {why} (simplify the "
                                             "schema: fewer alternatives, smaller maxLength/maxItems/enums)")
            raise GrammarCompileError(f"the schema's grammar could not be compiled: {why}")
        n = lib.agentrt_regex_dfa_states(handle)
        columns = np.empty((n + 1, lib.agentrt_regex_dfa_nclasses(handle)), dtype=np.int32)
        final = np.empty(n + 1, dtype=np.uint8)
        classes = np.empty(256, dtype=np.uint8)
        lib.agentrt_regex_dfa_columns(handle, columns.ctypes.data, final.ctypes.data)
        lib.agentrt_regex_dfa_classes(handle, classes.ctypes.data)
        return columns, final.view(bool), classes
    finally:
        lib.agentrt_regex_dfa_free(handle)


def minimize_table(lib: ctypes.CDLL, table: np.ndarray, final: np.ndarray,
                   classes: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(each state's state in the minimal DFA [S + 1] int32, its number of states with the dead one, which
    comes last) of the DFA ``table`` [S + 1, 256] (row S dead) whose bytes of one of ``classes`` [256]
    have equal columns; None when it is too large to minimize."""
    table = np.ascontiguousarray(table, dtype=np.int32)
    final = np.ascontiguousarray(final, dtype=np.uint8)
    classes = np.ascontiguousarray(classes, dtype=np.uint8)
    block_of = np.empty(table.shape[0], dtype=np.int32)
    m = lib.agentrt_dfa_minimize(table.ctypes.data, final.ctypes.data, table.shape[0], classes.ctypes.data,
                                 block_of.ctypes.data)
    return None if m < 0 else (block_of, m)
