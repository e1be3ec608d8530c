"""Peer grammar engines for `agentrt bench grammar`'s side-by-side: xgrammar and llguidance.

Both are optional (benchmarks only, not in CI): ``load_peers`` returns the ones that import and a
note for each that does not. Each peer is configured like our grammar so the comparison is fair:
compact JSON only (separators "," and ":", no free whitespace) and strict about what it cannot
enforce. ``Peer.config`` says exactly how, for the printed output.

A peer answers four things on one schema: compile it (or refuse it), whether it accepts an
instance's bytes as a complete value, the time to compute the next-token mask along a token
sequence (the per-token cost a constrained decoder pays), and a fresh walk through its grammar token
by token (`grammar_samples` draws values with it).
"""
from __future__ import annotations

import importlib.util
import json
import re
import time
from typing import Any

import numpy as np


class PeerRefused(Exception):
    """The peer refused (or failed) to compile a schema; the message says why."""


class Peer:
    """A grammar engine compiled against one tokenizer (the embedded model's)."""

    name = ""
    config = ""

    def compile(self, schema: dict) -> Any:
        """The peer's compiled grammar for ``schema``; PeerRefused when it will not compile it."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Forget compiled grammars, so the next compile is cold (no-op for a peer without a cache)."""

    def accepts(self, compiled: Any, text: str) -> bool:
        """Whether the grammar admits ``text`` (its UTF-8 bytes) as one complete value."""
        raise NotImplementedError

    def mask_times_us(self, compiled: Any, token_ids: list[int]) -> list[float] | None:
        """Microseconds to compute the mask before each token, accepting each token in turn;
        None if the grammar rejects the sequence (then the timings would not mean anything)."""
        raise NotImplementedError

    def walk(self, compiled: Any):
        """A fresh `grammar_samples.TokenWalk` through ``compiled``."""
        raise NotImplementedError


def _bitmask_ids(bitmask: Any, vocab_size: int) -> np.ndarray:
    """The token ids set in row 0 of an int32 token bitmask (bit i of word w: token 32 w + i)."""
    bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


class XGrammarPeer(Peer):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int = 2, strict: bool = True):
        """``strict`` is xgrammar's strict_mode: True (the default) refuses properties and items the
        schema does not declare even where JSON Schema allows them (ours and llguidance follow
        JSON Schema there); False follows JSON Schema."""
        import xgrammar

        self._xgr = xgrammar
        self.strict = strict
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True)
        self.bitmask = xgrammar.allocate_token_bitmask(1, self.info.vocab_size)
        self.config = (f"xgrammar {_version('xgrammar')}: compile_json_schema(any_whitespace=False, "
                       f"separators=(',', ':'), strict_mode={strict})"
                       + ("  [strict: no properties/items beyond the schema's]" if strict else ""))

    def compile(self, schema: dict) -> Any:
        try:
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(",", ":"), strict_mode=self.strict)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types
            # drop the C++ log prefix "[21:44:11] /project/cpp/json_schema_converter.cc:1499: "
            first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", (str(e).splitlines() or [""])[0])
            raise PeerRefused(f"{type(e).__name__}: {first[:160]}") from None

    def clear_cache(self) -> None:
        self.compiler.clear_cache()

    def accepts(self, compiled: Any, text: str) -> bool:
        m = self._xgr.GrammarMatcher(compiled)
        return bool(m.accept_string(text.encode("utf-8")) and m.is_completed())

    def mask_times_us(self, compiled: Any, token_ids: list[int]) -> list[float] | None:
        m = self._xgr.GrammarMatcher(compiled)
        out = []
        for t in token_ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(self.bitmask)
            out.append((time.perf_counter() - t0) * 1e6)
            if not m.accept_token(t):
                return None
        return out

    def walk(self, compiled: Any):
        return _XGrammarWalk(self, compiled)


class _XGrammarWalk:
    def __init__(self, peer: XGrammarPeer, compiled: Any):
        self.peer, self.m = peer, peer._xgr.GrammarMatcher(compiled)
        self.stop = np.asarray(peer.info.stop_token_ids, dtype=np.int64)
        self.ids: np.ndarray | None = None  # the mask here, stop tokens included (computed once a position)

    def _mask(self) -> np.ndarray:
        if self.ids is None:
            self.m.fill_next_token_bitmask(self.peer.bitmask)
            self.ids = _bitmask_ids(self.peer.bitmask, self.peer.info.vocab_size)
        return self.ids

    def allowed(self) -> np.ndarray:
        ids = self._mask()
        return ids[~np.isin(ids, self.stop)]

    def can_stop(self) -> bool:
        return bool(np.isin(self.stop, self._mask()).any())

    def accept(self, token_id: int) -> bool:
        self.ids = None
        return bool(self.m.accept_token(token_id))


class LLGuidancePeer(Peer):
    name = "llguidance"
    OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": False}

    def __init__(self, tokenizer: Any, vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self._llg = llguidance
        self._fill = llguidance.torch.fill_next_token_bitmask
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, self.tok.vocab_size)
        self.config = (f"llguidance {_version('llguidance')}: grammar_from_json_schema(overrides={self.OPTIONS}) "
                       "[lenient False: unknown keywords are an error]")

    def compile(self, schema: dict) -> Any:
        llg = self._llg
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=self.OPTIONS)
        except ValueError as e:
            raise PeerRefused(str(e)[:160]) from None
        m = llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise PeerRefused(m.get_error().splitlines()[0][:160])
        return m

    def accepts(self, compiled: Any, text: str) -> bool:
        # a copy per check: a rejected token leaves an LLMatcher in an error state for good
        m = compiled.deep_copy()
        return bool(m.consume_tokens(self.tok.tokenize_bytes(text.encode("utf-8"))) and m.is_accepting())

    def mask_times_us(self, compiled: Any, token_ids: list[int]) -> list[float] | None:
        m = compiled.deep_copy()
        out = []
        for t in token_ids:
            t0 = time.perf_counter()
            self._fill(m, self.bitmask, 0)
            out.append((time.perf_counter() - t0) * 1e6)
            if not m.consume_token(t):
                return None
        return out

    def walk(self, compiled: Any):
        return _LLGuidanceWalk(self, compiled)


class _LLGuidanceWalk:
    def __init__(self, peer: LLGuidancePeer, compiled: Any):
        self.peer, self.m = peer, compiled.deep_copy()
        self.eos = peer.tok.eos_token

    def allowed(self) -> np.ndarray:
        self.peer._fill(self.m, self.peer.bitmask, 0)
        ids = _bitmask_ids(self.peer.bitmask, self.peer.tok.vocab_size)
        return ids[ids != self.eos]

    def can_stop(self) -> bool:
        return bool(self.m.is_accepting())

    def accept(self, token_id: int) -> bool:
        return bool(self.m.consume_token(token_id))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


PEERS = {"xgrammar": XGrammarPeer, "llguidance": LLGuidancePeer}


def load_peers(tokenizer: Any, vocab_size: int, names: list[str] | None = None,
               options: dict[str, dict] | None = None) -> tuple[list[Peer], list[str]]:
    """The installed peers among ``names`` (default: all), built for ``tokenizer`` (with keyword
    ``options`` per peer name, e.g. {"xgrammar": {"strict": False}}), and a note for each one
    skipped (not installed, or failed to load)."""
    peers, notes = [], []
    for name in names if names is not None else list(PEERS):
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}: choose from {', '.join(PEERS)}")
        if importlib.util.find_spec(name) is None:
            notes.append(f"{name} is not installed: its rows are skipped (pip install {name} to compare)")
            continue
        try:
            peers.append(PEERS[name](tokenizer, vocab_size, **(options or {}).get(name, {})))
        except Exception as e:  # noqa: BLE001 - a broken optional install must not stop our own figures
            notes.append(f"{name} failed to load ({type(e).__name__}: {str(e)[:120]}): its rows are skipped")
    return peers, notes


def installed_peers() -> list[str]:
    """Names of the peers whose packages are importable (without importing them)."""
    return [n for n in PEERS if importlib.util.find_spec(n) is not None]
