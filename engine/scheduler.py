"""Continuous batching: which sequences compute how many tokens in the next step.

Every step the scheduler fills a token budget (``max_num_batched_tokens``): one token for each
running sequence that is decoding, chunks of pending prefills, then newly admitted sequences, so
a long prompt is prefilled a chunk per step while the others keep decoding.

Order is by priority (lower first; ties by arrival): the waiting queue is admitted in that order
and, when the KV pool runs out, the running sequence with the lowest priority is preempted (its
blocks are released, they stay in the prefix cache, and it is recomputed later). A sequence's
priority defaults to its arrival time (FIFO); an agent run passes its start time, so the later
steps of a run that started earlier go ahead of newer work, as in vLLM's priority scheduling.
Preemption never takes a sequence of higher priority than the one that needs the blocks, so the
highest-priority sequence always progresses: no livelock, and a stream of newer arrivals cannot
postpone an older run's step indefinitely.

A decoding sequence may carry a draft (`engine.speculation`): its draft tokens run as extra rows
after its pending ones when the token budget and free blocks allow, never preempting anything.

A sequence that finishes (stop or length) while its last tokens (the last sampled token and any
forced closing tokens) were never run through the model is kept as *finishing*: the next step
computes those tokens' K/V (no sampling) and then releases its blocks into the prefix cache, so
a later prompt that extends the whole sequence (an agent's next step) is served every token of
it. The finished output is delivered first; the tail costs the next step a few tokens. A
sequence with a cache key (an agent run's id) then leaves its blocks pinned for the key's next
sequence (`BlockManager.pin`), which unpins them when admitted.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence


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
        self.waiting: list[Sequence] = []  # sorted by order_key
        self.running: list[Sequence] = []
        self.finishing: list[Sequence] = []  # finished, tail K/V still to compute (see the module doc)

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.finishing)

    def remove(self, seq: Sequence, pin: bool = False) -> None:
        """Drop a sequence (aborted, or finished without a tail to keep) and release its blocks now
        (``pin``: under its cache key, see `BlockManager.pin`)."""
        for queue in (self.running, self.waiting, self.finishing):
            if seq in queue:
                queue.remove(seq)
                break
        self.bm.free(seq, pin_key=seq.cache_key if pin else None)

    def finish(self, seq: Sequence) -> None:
        """A sequence ended with ``seq.finish_reason``. With prefix caching, a stop/length finish
        whose last tokens have no K/V yet is kept as finishing (the next step computes them, then
        `release_finishing` frees it); anything else is released now."""
        keep = (self.bm.enable_prefix_caching and seq.finish_reason in ("stop", "length")
                and seq in self.running and seq.num_uncomputed > 0)
        if not keep:
            self.remove(seq, pin=seq.finish_reason in ("stop", "length"))
            return
        self.running.remove(seq)
        self.finishing.append(seq)

    def release_finishing(self, all_: bool = False) -> None:
        """Release the finishing sequences whose tails are computed (``all_``: every one, e.g.
        after a failed step); their blocks go to the prefix cache."""
        keep = []
        for seq in self.finishing:
            if all_ or seq.num_uncomputed == 0:
                self.bm.free(seq, pin_key=seq.cache_key)
            else:
                keep.append(seq)
        self.finishing = keep

    def schedule(self) -> ScheduledStep | None:
        self.bm.expire_pins()
        budget = self.max_num_batched_tokens
        singles: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []

        def take(seq: Sequence, n: int) -> None:
            nonlocal budget
            self.bm.grow(seq, seq.num_computed_tokens + n)
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n

        # finishing tails first: a few tokens each, and their blocks are released right after
        for seq in list(self.finishing):
            n = min(seq.num_uncomputed, budget)
            if n > 0 and self.bm.can_grow(seq, seq.num_computed_tokens + n):
                take(seq, n)
            elif n > 0:  # no room: give up the tail rather than hold blocks or preempt for it
                self.finishing.remove(seq)
                self.bm.free(seq)

        # running sequences by priority; every decode keeps its one token of the budget
        self.running.sort(key=_key)
        decodes_left = sum(1 for s in self.running if s.num_uncomputed == 1)
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted earlier in this same pass
            decoding = seq.num_uncomputed == 1
            decodes_left -= decoding
            n = min(seq.num_uncomputed, budget - (0 if decoding else decodes_left))
            if n <= 0:
                continue
            if not self._make_room(seq, seq.num_computed_tokens + n, scheduled, preempted):
                continue
            scheduled.add(id(seq))
            take(seq, n + self._draft_rows(seq, n, budget - n - decodes_left))

        # admit waiting sequences in priority order while budgets allow
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if preempted and _key(seq) >= min(_key(p) for p in preempted):
                break  # memory is short: what was just preempted (or newer) waits for the next step
            if any(_extends_tail(seq, f) for f in self.finishing):
                break  # it extends a finishing sequence: admit it after that tail is in the cache
            cached = self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n, scheduled, preempted):
                self.bm.free(seq)
                break
            self.waiting.pop(0)
            if seq.cache_key is not None:  # the key's next step holds what it reuses now
                self.bm.unpin(seq.cache_key)
            if not seq.admitted:
                seq.admitted = True
                # Tokens forced at admission may extend past the prompt and hit the cache
                # too; usage reports only the prompt's cached share.
                seq.cached_tokens = min(cached, seq.num_prompt_tokens)
                seq.first_scheduled_time = time.perf_counter()
                self.bm.record_query(seq.num_prompt_tokens, seq.cached_tokens)
            self.running.append(seq)
            scheduled.add(id(seq))
            take(seq, n)

        if not singles and not chunks:
            return None if not preempted else ScheduledStep([], preempted)
        return ScheduledStep(singles + chunks, preempted)

    def _draft_rows(self, seq: Sequence, n: int, room: int) -> int:
        """How many of ``seq``'s draft tokens run after its ``n`` pending rows: all that fit the
        token budget left (``room``) and free KV blocks, only once every pending token runs; a
        draft never preempts anything. Trims the draft to them."""
        d = min(len(seq.draft_token_ids), max(0, room)) if n == seq.num_uncomputed else 0
        while d > 0 and not self.bm.can_grow(seq, seq.num_computed_tokens + n + d):
            d -= 1
        del seq.draft_token_ids[d:]
        return d

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int], preempted: list[Sequence]) -> bool:
        """Whether ``seq`` can hold ``num_tokens``, after preempting running sequences of lower
        priority than ``seq`` that are not in this step yet (the lowest first)."""
        while not self.bm.can_grow(seq, num_tokens):
            victim = next((s for s in reversed(self.running) if id(s) not in scheduled and s is not seq
                           and _key(s) > _key(seq)), None)
            if victim is None:
                if seq in self.running and id(seq) not in scheduled:
                    self._preempt(seq)  # nothing below it to take from: it waits (its blocks help the others)
                    preempted.append(seq)
                return False
            self._preempt(victim)
            preempted.append(victim)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.block_hashes = []
        self.add(seq)


def _key(seq: Sequence) -> tuple[float, float]:
    return seq.order_key


def _extends_tail(seq: Sequence, fin: Sequence) -> bool:
    """Whether ``seq``'s tokens run into ``fin``'s not-yet-computed tail (so it should wait for it)."""
    n = fin.num_computed_tokens + 1
    return len(seq.token_ids) > n and seq.token_ids[:n] == fin.token_ids[:n]
