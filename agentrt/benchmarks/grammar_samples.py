"""Sampled soundness for `agentrt bench grammar`: values drawn at random from each engine's own grammar,
checked against the schema with jsonschema.

MaskBench's instances test a grammar only where the data has instances, and 134 of Handwritten's 147
schemas have none: a grammar that drops a keyword it cannot enforce (xgrammar warns "Support for allOf
with multiple options is still ongoing" and goes on) would count as exact there. A grammar that admits an
invalid value lets a model generate it, so each engine here generates a few values itself, and one that
is not valid JSON or not valid against the schema makes the schema inexact for that engine.

The walks are random with a pull towards the end that grows with length (closing quotes and brackets,
for us the bytes that shorten the way to a complete value), so most of them finish; a walk that does not
finish within its length proves nothing and is dropped. ``format`` is an annotation here, as JSON Schema
2020-12 has it by default: a peer is not blamed for a format it does not assert.
"""
from __future__ import annotations

import json
import random
import zlib
from typing import Any, Protocol

import numpy as np

MAX_TOKENS = 256
MAX_BYTES = 2048


class TokenWalk(Protocol):
    """One walk through a peer's grammar (a fresh matcher)."""

    def allowed(self) -> np.ndarray:
        """Token ids allowed next (stop tokens excluded), int64."""

    def can_stop(self) -> bool:
        """Whether the text so far is a complete value."""

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False when the matcher rejects it."""


def case_rng(case_id: str) -> random.Random:
    """The same draws for a schema on every run and every engine's turn."""
    return random.Random(zlib.crc32(case_id.encode()))


def _pull(step: int, scale: float) -> float:
    """Probability of moving towards the end at ``step``: low at first, so values vary, then near 1."""
    return min(0.95, 0.15 + step / scale)


def sample_dfa(dfa: Any, rng: random.Random, n: int, max_bytes: int = MAX_BYTES) -> list[bytes]:
    """Up to ``n`` complete values drawn from a byte DFA (ours): a random live byte, or with growing
    probability one that leads closer to a complete value; a walk may stop wherever the value is complete."""
    dist = dfa.byte_distances(np.ones(256, dtype=bool))
    inf = np.iinfo(np.int32).max // 2
    out = []
    if dist[dfa.initial] >= inf:
        return out
    for _ in range(n):
        state, data = dfa.initial, bytearray()
        while len(data) < max_bytes:
            if dfa.final[state] and rng.random() < _pull(len(data), 64.0):
                out.append(bytes(data))
                break
            live = dfa.live_bytes(state)
            nxt = dfa.row(state)[live]
            ok = dist[nxt] < inf  # bytes after which a complete value is still reachable
            live, nxt = live[ok], nxt[ok]
            if not live.size:  # only the end is left
                out.append(bytes(data))
                break
            if rng.random() < _pull(len(data), 64.0):
                closer = live[dist[nxt] == dist[nxt].min()]
                byte = int(closer[rng.randrange(closer.size)])
            else:
                byte = int(live[rng.randrange(live.size)])
            data.append(byte)
            state = dfa.next(state, byte)
    return out


class TokenSampler:
    """Draws values from a peer's grammar token by token, for one tokenizer's vocabulary."""

    def __init__(self, token_bytes: dict[int, bytes], vocab_size: int):
        self.token_bytes = token_bytes
        self.known = np.zeros(vocab_size, dtype=bool)  # ordinary tokens (special ones have no text here)
        self.single = np.zeros(vocab_size, dtype=bool)
        self.closer = np.zeros(vocab_size, dtype=bool)  # tokens that end a string, object or array
        for t, b in token_bytes.items():
            if t < vocab_size:
                self.known[t] = True
                self.single[t] = len(b) == 1
                self.closer[t] = b in (b'"', b"}", b"]")

    def sample(self, start, rng: random.Random, n: int, max_tokens: int = MAX_TOKENS) -> list[bytes]:
        """Up to ``n`` complete values, each from a fresh walk ``start()``."""
        out = []
        for _ in range(n):
            walk: TokenWalk = start()
            data = bytearray()
            for step in range(max_tokens):
                pull = _pull(step, 32.0)
                if walk.can_stop() and rng.random() < pull:
                    out.append(bytes(data))
                    break
                ids = walk.allowed()
                ids = ids[self.known[ids]]
                if not ids.size:
                    break
                closers, singles = ids[self.closer[ids]], ids[self.single[ids]]
                if closers.size and rng.random() < pull:
                    pool = closers
                elif singles.size and rng.random() < 0.6:  # short steps: more of the grammar's branches per walk
                    pool = singles
                else:
                    pool = ids
                token = int(pool[rng.randrange(pool.size)])
                if not walk.accept(token):
                    break
                data += self.token_bytes[token]
        return out


def invalid_samples(schema: Any, samples: list[bytes]) -> list[bytes] | None:
    """The samples that are not JSON or not valid against ``schema`` (formats not asserted); None when
    jsonschema cannot check this schema (a pattern Python's re does not read, say)."""
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator = cls(schema)
        bad = []
        for data in samples:
            try:
                value = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                bad.append(data)
                continue
            if not validator.is_valid(value):
                bad.append(data)
        return bad
    except Exception:  # noqa: BLE001 - jsonschema's own limits (bad $ref, unreadable pattern) leave it unchecked
        return None
