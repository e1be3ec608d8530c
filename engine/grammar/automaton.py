"""Regex -> token-level automaton with outlines-core's ``Index``, under a time limit.

outlines-core 0.2.14's Index drops a transition that leaves a match state into a non-match
state (``a(?:bc)?`` does not accept "abc"; a top-level ``1.5`` is cut after ``1``): it works
only for prefix-free languages. So the regex is compiled with an end sentinel (U+10FFFF,
never generated: tokens holding its lead byte 0xF4 are excluded) appended, which makes
every language prefix-free; "may end here" = "the sentinel token leads to an accepting state".

``Index`` construction runs in Rust and cannot be interrupted from Python, so when a time
limit is given it runs in a forked child process that is killed at the deadline (a run-away
compile then costs nothing after the error). The index comes back pickled.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
from outlines_core import Index, Vocabulary

from .errors import GrammarCompileError


SENTINEL = "\U0010FFFF"
_SENTINEL_BYTES = SENTINEL.encode()
_SENTINEL_RE = r"\x{10FFFF}"


def outlines_vocabulary(token_bytes: dict[int, bytes], width: int) -> Vocabulary:
    """An outlines ``Vocabulary`` from token id -> bytes, plus the end sentinel (id ``width``)
    and a placeholder EOS (id ``width + 1``); tokens containing the sentinel's lead byte are left out."""
    by_bytes: dict[bytes, list[int]] = {_SENTINEL_BYTES: [width]}
    for tid, b in token_bytes.items():
        if _SENTINEL_BYTES[0] not in b:
            by_bytes.setdefault(b, []).append(tid)
    return Vocabulary(width + 1, by_bytes)


class TokenIndex:
    """The token automaton of one regex: states, transitions, allowed ids, may-end states."""

    def __init__(self, index: Index, width: int):
        self.index = index
        self.width = width  # ids >= width are the sentinel / placeholder, never exposed

    def initial_state(self) -> int:
        return self.index.get_initial_state()

    def next_state(self, state: int, token_id: int) -> int | None:
        if token_id >= self.width:
            return None
        return self.index.get_next_state(state, token_id)

    def allowed_ids(self, state: int) -> np.ndarray:
        raw = np.asarray(self.index.get_allowed_tokens(state), dtype=np.int64)
        return raw[raw < self.width]

    def is_final(self, state: int) -> bool:
        # The sentinel must lead to the end: inside a string whose characters include U+10FFFF
        # it is read as one more character (a non-final state), and EOS must not be allowed there.
        nxt = self.index.get_next_state(state, self.width)
        return nxt is not None and self.index.is_final_state(nxt)


_CHILD_MEMORY_BYTES = 2 << 30  # what a compile may allocate beyond the forked parent's address space


def _cap_memory(extra_bytes: int) -> None:
    """Limit this (forked) process's address space to its current size + ``extra_bytes``, so a runaway
    automaton fails its own compile instead of drawing the OOM killer onto the server."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + extra_bytes, resource.RLIM_INFINITY))
    except (OSError, ValueError, ImportError):  # not Linux: no cap, the time limit still applies
        pass


def _child(regex: str, vocabulary: Vocabulary, conn) -> None:  # noqa: ANN001
    _cap_memory(_CHILD_MEMORY_BYTES)
    try:
        payload = pickle.dumps(("ok", Index(regex, vocabulary)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
    try:
        conn.send_bytes(payload)
    finally:
        conn.close()
        os._exit(0)


def build_index(regex: str, vocabulary: Vocabulary, width: int, timeout_s: float | None) -> TokenIndex:
    """Compile ``regex`` over ``vocabulary`` (made by outlines_vocabulary(..., width));
    GrammarCompileError on failure or timeout."""
    return TokenIndex(_build(f"(?:{regex}){_SENTINEL_RE}", vocabulary, timeout_s), width)


def _build(regex: str, vocabulary: Vocabulary, timeout_s: float | None) -> Index:
    if timeout_s is None:
        try:
            return Index(regex, vocabulary)
        except Exception as e:  # noqa: BLE001
            raise GrammarCompileError(f"the schema's regex could not be compiled: {e}") from None
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(regex, vocabulary, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise GrammarCompileError(
                f"compiling the schema took longer than {timeout_s:g}s and was stopped "
                "(simplify it: fewer alternatives, smaller enums/maxLength/maxItems, or raise timeout_s)"
            )
        try:
            status, value = pickle.loads(recv.recv_bytes())
        except EOFError:
            raise GrammarCompileError("the grammar compiler process died (out of memory?)") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    if status != "ok":
        raise GrammarCompileError(f"the schema's regex could not be compiled: {value}")
    return value


class ByteAutomaton:
    """The regex as a byte-level automaton (256 one-byte tokens): exact full-match tests of
    text against the same DFA construction the token index uses."""

    def __init__(self, regex: str, timeout_s: float | None = None):
        vocab = outlines_vocabulary({b: bytes([b]) for b in range(256)}, 256)
        self.index = build_index(regex, vocab, 256, timeout_s)

    def fullmatch(self, text: str | bytes) -> bool:
        data = text.encode("utf-8") if isinstance(text, str) else text
        state: int | None = self.index.initial_state()
        for b in data:
            state = self.index.next_state(state, b)  # type: ignore[arg-type]
            if state is None:
                return False
        return self.index.is_final(state)  # type: ignore[arg-type]
