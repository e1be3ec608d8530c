"""Continuous batching: which sequences compute how many tokens in the next step.

Every step the scheduler fills a token budget (``max_num_batched_tokens``): first one token for
each running sequence that is decoding, then chunks of pending prefills (running ones first,
then newly admitted ones), so a long prompt is prefilled a chunk per step while the others keep
decoding. When the KV pool runs out, the most recently admitted sequence is preempted: its
blocks are released (they stay in the prefix cache) and it is recomputed later.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .config import SamplingParams
from .kv_cache import BlockManager


@dataclass(eq=False)  # identity semantics: sequences live in lists and sets
class Sequence:
    """One request's state inside the engine."""

    request_id: str
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    params: SamplingParams
    constraint: Any = None
    generator: Any = None  # torch.Generator when seeded
    arrival_time: float = field(default_factory=time.perf_counter)
    # KV state
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # progress
    admitted: bool = False
    cached_tokens: int = 0
    forced_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    error: BaseException | None = None  # a failing constraint ends only its own request
    # text state (see engine._detokenize)
    text: str = ""
    sent_text_len: int = 0
    stop_token_at_end: bool = False

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ScheduledStep:
    """The sequences of one step and how many of their pending tokens each computes;
    one-token entries come first."""

    entries: list[tuple[Sequence, int]]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)


class Scheduler:
    """Admits waiting sequences and plans each step within the token and sequence budgets."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)

    def schedule(self) -> ScheduledStep | None:
        budget = self.max_num_batched_tokens
        singles: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        # running sequences: decodes first, then prefill chunks
        order = sorted(self.running, key=lambda s: s.num_uncomputed != 1)
        for seq in order:
            if budget == 0:
                break
            if seq not in self.running:
                continue  # preempted earlier in this same pass
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                continue
            while not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq not in self.running or not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                continue
            self.bm.grow(seq, seq.num_computed_tokens + n)
            scheduled.add(id(seq))
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n

        # admit waiting sequences while budgets allow
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            cached = self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                self.bm.free(seq)
                break
            self.bm.grow(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            if not seq.admitted:
                seq.admitted = True
                # Tokens forced at admission may extend past the prompt and hit the cache
                # too; usage reports only the prompt's cached share.
                seq.cached_tokens = min(cached, seq.num_prompt_tokens)
                seq.first_scheduled_time = time.perf_counter()
                self.bm.record_query(seq.num_prompt_tokens, seq.cached_tokens)
            self.running.append(seq)
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n

        if not singles and not chunks:
            return None if not preempted else ScheduledStep([], preempted)
        return ScheduledStep(singles + chunks, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.block_hashes = []
        self.waiting.appendleft(seq)
