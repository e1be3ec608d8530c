"""GrammarCompiler (one per model/tokenizer) -> CompiledGrammar (one per schema, shared by
requests) -> GrammarMatcher (one per request; see matcher.py). The chain has no way back: this
module knows neither the budget planning (budget.py) nor the matcher.

Compiled grammars are cached in memory (LRU) and on disk (LRU under a size cap, see disk_cache.py),
keyed by the tokenizer's content hash and the schema's hash, so a second compile of a schema costs a
dict look-up.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from . import native_dfa
from .automaton import run_bounded, workers
from .byte_dfa import ByteDFA
from .compile_job import compile_schema, warm_up
from .disk_cache import DiskCache, default_cache_dir
from .errors import GrammarCompileError
from .token_walk import TokenTable
from .vocab import TokenVocab, vocab_from_tokenizer

COMPILER_VERSION = "22"  # bump when the regex a schema compiles to may change (invalidates disk caches)
_MAX_FORCED_BYTES = 512


class CompiledGrammar:
    """A schema compiled to a byte DFA, for one vocabulary. Immutable as far as callers are concerned;
    it computes each state's allowed tokens when first asked (`TokenTable.walk`) and keeps them, with
    masks and forced-token runs, shared by all its matchers."""

    def __init__(self, schema: Any, regex: str, dfa: ByteDFA, tokens: TokenTable, vocab: TokenVocab, encode,
                 unenforced: list[str], lenient: bool, mask_cache_size: int = 512):
        self.schema = schema
        self.regex = regex
        self.dfa = dfa
        self.tokens = tokens
        self.vocab = vocab
        self.unenforced = list(unenforced)  # keywords only checked after generation (lenient)
        self.lenient = lenient
        self.compile_s = 0.0
        self.from_cache = ""  # "", "memory" or "disk"
        self.automaton_bytes = dfa.nbytes
        self.walks = 0  # states whose allowed tokens were computed (each once)
        self._state_bytes = 0  # what the per-state caches below hold (see `nbytes`)
        self._encode = encode
        self._eos = torch.tensor(vocab.eos_token_ids, dtype=torch.long)
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._mask_cache_size = mask_cache_size
        self._successors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._forced: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._validator = None
        self.token_distances = None  # budget.distances(grammar) computes and keeps its TokenDistances here
        self.byte_distances = None  # and budget.byte_distances(grammar) its ByteDistances
        self.distances_lock = threading.Lock()  # not _lock: the engine's mask() calls must not wait on a build

    @property
    def nbytes(self) -> int:
        """What the compiler's memory cache counts for this grammar: its DFA plus the per-state masks
        and allowed tokens it has computed since (these grow as requests visit states, and a state
        inside a string can allow most of the vocabulary: ~0.8 MB of ids and targets for a 49k vocabulary)."""
        return self.automaton_bytes + self._state_bytes

    # -- per-state queries (cached) ---------------------------------------------------
    def initial_state(self) -> int:
        return self.dfa.initial

    def successors(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(ordinary token ids allowed in ``state`` [n] int64 ascending, the state each leads to [n] int64),
        computed on the first query of ``state``."""
        hit = self._successors.get(state)
        if hit is None:
            hit = self.tokens.walk(self.dfa, state)
            with self._lock:
                if state not in self._successors:
                    self._successors[state] = hit
                    self._state_bytes += hit[0].nbytes + hit[1].nbytes
                    self.walks += 1
        return hit

    def allowed_ids(self, state: int) -> np.ndarray:
        """Ordinary (non-EOS) token ids allowed in ``state``, as an int64 array."""
        return self.successors(state)[0]

    def is_final(self, state: int) -> bool:
        """True when the output so far is a complete value (EOS allowed)."""
        return bool(self.dfa.final[state])

    def may_continue(self, state: int) -> bool:
        """True when some text may follow in ``state`` (after a complete value: more digits, say)."""
        return bool(self.dfa.live_bytes(state).size)

    def mask(self, state: int) -> torch.Tensor:
        """Bool [vocab_size] mask for ``state`` (cached; treat as read-only)."""
        m = self._masks.get(state)
        if m is not None:
            self._masks.move_to_end(state)
            return m
        m = torch.zeros(self.vocab.vocab_size, dtype=torch.bool)
        ids = self.allowed_ids(state)
        if ids.size:
            m[torch.from_numpy(ids)] = True
        if self.is_final(state):
            m[self._eos] = True
        with self._lock:
            if state not in self._masks:
                self._state_bytes += m.numel()
            self._masks[state] = m
            while len(self._masks) > self._mask_cache_size:
                self._state_bytes -= self._masks.popitem(last=False)[1].numel()
        return m

    def next_state(self, state: int, token_id: int) -> int | None:
        data = self.vocab.token_bytes.get(token_id)
        if data is None:
            return None
        nxt = self.dfa.step(state, data)
        return None if nxt == self.dfa.dead else nxt

    def forced_tokens(self, state: int) -> list[int]:
        """The jump-forward run from ``state`` (cached): the canonical tokenization of the
        only text the grammar admits next, minus the boundary token when free text follows."""
        toks = self._forced.get(state)
        if toks is None:
            toks = self._compute_forced(state)
            self._forced[state] = toks
        return toks

    def _compute_forced(self, state: int) -> list[int]:
        data = bytearray()
        s = state
        while len(data) < _MAX_FORCED_BYTES and not self.is_final(s):
            live = self.dfa.live_bytes(s)
            if live.size != 1 or int(live[0]) not in self.vocab.byte_token:
                break
            data.append(int(live[0]))
            s = self.dfa.next(s, int(live[0]))
        if not data:
            return []
        toks = self._tokenize(bytes(data), state)
        # Nothing but EOS may follow: the run is the whole rest, keep every token. Otherwise
        # hold back the last token: free text after it may merge with it into a longer token.
        ends = self.is_final(s) and not self.may_continue(s)
        return toks if ends else toks[:-1]

    def _tokenize(self, data: bytes, state: int) -> list[int]:
        try:
            toks = list(self._encode(data.decode("utf-8")))
        except UnicodeDecodeError:
            toks = []
        if not self._walks(toks, data, state):
            toks = self._greedy(data)
            if not self._walks(toks, data, state):
                return []
        return toks

    def _walks(self, toks: list[int], data: bytes, state: int) -> bool:
        tb = self.vocab.token_bytes
        if not toks or b"".join(tb.get(t, b"\x00\x00") for t in toks) != data:
            return False
        s: int | None = state
        for t in toks:
            s = self.next_state(s, t)  # type: ignore[arg-type]
            if s is None:
                return False
        return True

    def _greedy(self, data: bytes) -> list[int]:
        by_bytes = self.vocab.bytes_to_id()
        out, i, longest = [], 0, self.vocab.max_token_len
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                tid = by_bytes.get(data[i:i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                return []
        return out

    # -- helpers for callers ------------------------------------------------------------
    def accepts_tokens(self, token_ids: list[int], *, complete: bool = True) -> bool:
        """Whether the token sequence is admitted (and, if ``complete``, may end there)."""
        s: int | None = self.initial_state()
        for t in token_ids:
            s = self.next_state(s, t)  # type: ignore[arg-type]
            if s is None:
                return False
        return self.is_final(s) if complete else True  # type: ignore[arg-type]

    def validate(self, text: str) -> list[str]:
        """Errors of ``text`` against the full schema (jsonschema, formats asserted); [] if valid.
        The check lenient grammars rely on for the keywords listed in ``unenforced``."""
        import jsonschema

        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return [f"not JSON: {e}"]
        if self._validator is None:
            self._validator = jsonschema.Draft202012Validator(self.schema, format_checker=jsonschema.FormatChecker())
        return [f"{'/'.join(map(str, e.absolute_path)) or '/'}: {e.message}" for e in self._validator.iter_errors(value)]


# Larger schemas (a turn grammar of hundreds of tools) take longer than an attempt's time: the attempt
# would only add its time before the worker's compile
_QUICK_MAX_SCHEMA_CHARS = 32_000


def _quick_seconds() -> float:
    raw = os.environ.get("AGENTRT_GRAMMAR_IN_PROCESS_MS", "").strip()
    try:
        ms = float(raw) if raw else 20.0
    except ValueError:
        raise ValueError(f"$AGENTRT_GRAMMAR_IN_PROCESS_MS={raw!r}: give milliseconds (0: every compile in a worker)") from None
    return max(ms, 0.0) / 1e3


class GrammarCompiler:
    """Compiles JSON Schemas to token automata for one tokenizer (build once per model)."""

    def __init__(self, vocab: TokenVocab, encode, cache_dir: str | None = None,
                 memory_cache_size: int = 256, cache_max_bytes: int | None = None,
                 memory_cache_bytes: int = 128 << 20):
        self.vocab = vocab
        self._encode = encode
        self.tokens = TokenTable(vocab)
        native_dfa.library()  # built here once per machine (seconds), so no compile's time limit pays for it
        workers.prestart()  # so the first request's compile does not wait for a worker to start
        # a compile is first tried here, in-process, for this long (see quick.py): most tool schemas take
        # a millisecond or two, less than a worker's round trip
        self.quick_s = _quick_seconds()
        if self.quick_s:
            warm_up()  # what a worker does when it starts (~0.1 s), or the first attempts would pay it
        # one space per tokenizer; the size cap (None: $AGENTRT_GRAMMAR_CACHE_MB, default 256 MB) spans them all
        self.disk_cache = DiskCache(cache_dir if cache_dir is not None else default_cache_dir(), vocab.hash,
                                    cache_max_bytes)
        # in memory: the most recently used grammars, at most this many and this many bytes of automata (a
        # server's clients can send endless new schemas)
        self._memory: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._memory_size = memory_cache_size
        self._memory_bytes = memory_cache_bytes
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, cache_dir: str | None = None,
                       *, eos_token_ids: list[int] | None = None) -> GrammarCompiler:
        """Build from a transformers tokenizer; ``vocab_size`` is the model's logits width.
        ``eos_token_ids`` (default: the tokenizer's eos) are allowed wherever output may end."""
        vocab = vocab_from_tokenizer(tokenizer, vocab_size, eos_token_ids)
        if hasattr(tokenizer, "backend_tokenizer") or not hasattr(tokenizer, "encode_batch"):
            def encode(text: str) -> list[int]:
                return tokenizer.encode(text, add_special_tokens=False)
        else:  # a raw `tokenizers.Tokenizer`
            def encode(text: str) -> list[int]:
                return tokenizer.encode(text, add_special_tokens=False).ids
        return cls(vocab, encode, cache_dir)

    def compile_json_schema(self, schema: dict, *, lenient: bool = False, timeout_s: float | None = 10.0) -> CompiledGrammar:
        """Compile (or fetch from cache) the grammar for ``schema``.

        Strict mode raises UnsupportedSchemaError naming every keyword that cannot be enforced;
        ``lenient=True`` enforces the rest and lists the dropped ones in ``.unenforced`` (check
        the output with ``.validate``). GrammarCompileError for invalid schemas and timeouts.
        """
        t0 = time.perf_counter()
        try:
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GrammarCompileError(f"the schema is not JSON-serializable: {e}") from None
        key = hashlib.sha256(f"{COMPILER_VERSION}|{int(lenient)}|{text}".encode()).hexdigest()[:32]
        with self._lock:
            hit = self._memory.get(key)
            if hit is not None:
                self._memory.move_to_end(key)
                hit.from_cache = "memory"
                self._evict()
                return hit
        blob = self.disk_cache.load(key)
        try:
            regex, unenforced, dfa = pickle.loads(blob) if blob is not None else (None, [], None)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            dfa = None
        source = "disk" if dfa is not None else ""
        if dfa is None:
            quick_s = self.quick_s if len(text) <= _QUICK_MAX_SCHEMA_CHARS else 0.0
            blob = run_bounded(functools.partial(compile_schema, schema, lenient, timeout_s), timeout_s,
                               quick_s=quick_s)
            regex, unenforced, dfa = pickle.loads(blob)
            self.disk_cache.save(key, blob)
        grammar = CompiledGrammar(schema, regex, dfa, self.tokens, self.vocab, self._encode, unenforced, lenient)
        grammar.compile_s = time.perf_counter() - t0
        grammar.from_cache = source
        with self._lock:
            self._memory[key] = grammar
            self._evict()
        return grammar

    def _evict(self) -> None:
        """Drop least recently used grammars past the count or byte cap (held lock). Grammars grow as
        they are used (`CompiledGrammar.nbytes`), so this runs on every compile, hits included."""
        total = sum(g.nbytes for g in self._memory.values())
        while len(self._memory) > 1 and (len(self._memory) > self._memory_size or total > self._memory_bytes):
            total -= self._memory.popitem(last=False)[1].nbytes

    def memory_cache_bytes(self) -> int:
        """Bytes the in-memory cache holds: its grammars' DFA tables and per-state masks
        and allowed-token arrays."""
        with self._lock:
            return sum(g.nbytes for g in self._memory.values())

