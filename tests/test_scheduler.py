"""The scheduler alone (no model): priority order under a stream of new arrivals, preemption
that never takes a higher-priority sequence (so no livelock), finishing tails, and speculative
drafts that only use free room."""
from __future__ import annotations

import itertools

from agentrt.engine import SamplingParams
from agentrt.engine.kv_cache import BlockManager
from agentrt.engine.scheduler import Scheduler
from agentrt.engine.sequence import Sequence

_ids = itertools.count()


def request(prompt_len: int, max_tokens: int, t: float, priority: float | None = None) -> Sequence:
    """A sequence arriving at (fake) time ``t``; prompts never share a prefix."""
    base = next(_ids) * 1000
    return Sequence(request_id=str(base), token_ids=[base + i for i in range(prompt_len)],
                    num_prompt_tokens=prompt_len, params=SamplingParams(max_tokens=max_tokens),
                    arrival_time=t, priority=priority)


def step(sched: Scheduler) -> list[Sequence]:
    """What `LLMEngine.step` does around the model: compute the planned tokens, 'sample' one
    token for every sequence that is fully computed, finish at max_tokens. Returns the finished."""
    plan = sched.schedule()
    done: list[Sequence] = []
    if plan is None:
        return done
    for seq, n in plan.entries:
        seq.num_computed_tokens += n
        sched.bm.commit_full_blocks(seq)
    sched.release_finishing()
    for seq, _ in plan.entries:
        if seq.finished or seq.num_uncomputed:
            continue
        seq.token_ids.append(7)
        if seq.num_output_tokens >= seq.params.max_tokens:
            seq.finish_reason = "length"
            sched.finish(seq)
            done.append(seq)
    return done


def test_new_arrivals_cannot_postpone_an_older_runs_step():
    # two sequence slots, one new request every step (more than the slots can serve), so the
    # queue only grows; a run that started at t=0 sends its next step at t=10: it must get the
    # next free slot, not wait behind the newer requests already queued
    sched = Scheduler(BlockManager(512, 4), max_num_seqs=2, max_num_batched_tokens=64)
    max_tokens = 4
    run_step = None
    admitted_at = None
    for t in range(60):
        sched.add(request(6, max_tokens, t=float(t)))
        if t == 10:
            run_step = request(6, max_tokens, t=float(t), priority=0.0)
            sched.add(run_step)
        step(sched)
        if run_step is not None and admitted_at is None and run_step.admitted:
            admitted_at = t
    assert len(sched.waiting) > 20  # the stream really outpaced the slots
    # a slot frees within one request's lifetime (prefill + max_tokens - 1 decodes)
    assert admitted_at is not None and admitted_at - 10 <= max_tokens, admitted_at


def test_preemption_never_takes_a_higher_priority_sequence_and_cannot_livelock():
    # 10 blocks of 4 tokens: the old run's step (32 tokens = 8 blocks at the end) and newer
    # requests (16 tokens = 4 blocks each) do not all fit, and newer ones keep arriving
    sched = Scheduler(BlockManager(10, 4), max_num_seqs=3, max_num_batched_tokens=64)
    preempted: list[Sequence] = []
    inner = sched._preempt
    sched._preempt = lambda s: (preempted.append(s), inner(s))
    newer = [request(8, 8, t=float(t) + 1) for t in range(2)]
    for s in newer:
        sched.add(s)
    step(sched)
    old = request(12, 20, t=2.0, priority=0.0)
    sched.add(old)
    finished: list[Sequence] = []
    old_done_at = None
    for t in range(3, 400):
        if t < 60:
            s = request(8, 8, t=float(t) + 1)
            newer.append(s)
            sched.add(s)
        plan_had_work = sched.has_unfinished()
        done = step(sched)
        finished += done
        if old in done:
            old_done_at = t
        if not sched.has_unfinished():
            break
        assert plan_had_work
    assert old not in preempted and preempted  # memory was short, and only newer work gave way
    assert old_done_at is not None and old_done_at - 2 <= 20 + 2, old_done_at  # never postponed
    assert set(map(id, finished)) == set(map(id, [old, *newer]))  # everyone finished: no livelock
    assert sched.bm.num_used == 0


def test_finishing_tail_is_scheduled_next_step_and_delays_an_extension_one_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = request(10, 2, t=0.0)
    sched.add(a)
    while not a.finished:
        step(sched)
    assert sched.finishing == [a] and a.num_uncomputed == 1
    ext = Sequence(request_id="ext", token_ids=a.token_ids + [5, 6], num_prompt_tokens=len(a.token_ids) + 2,
                   params=SamplingParams(max_tokens=1), arrival_time=1.0)
    other = request(5, 1, t=2.0)
    sched.add(ext)
    sched.add(other)
    plan = sched.schedule()
    assert [(s, n) for s, n in plan.entries] == [(a, 1)]  # the extension (queue head) waits for the tail
    for s, n in plan.entries:
        s.num_computed_tokens += n
        sched.bm.commit_full_blocks(s)
    sched.release_finishing()
    assert not sched.finishing
    plan = sched.schedule()
    assert plan.entries[0][0] is ext and ext.cached_tokens == len(a.token_ids)


def test_a_draft_runs_only_in_free_room_and_never_preempts():
    # 4 blocks of 4 tokens: a decoding sequence (6 tokens + 1 sampled) has room for its whole draft
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = request(6, 16, t=0.0)
    sched.add(a)
    step(sched)  # a's prompt; 'samples' one token
    a.draft_token_ids = [1, 2, 3, 4, 5]
    plan = sched.schedule()
    assert plan.entries == [(a, 6)] and a.draft_token_ids == [1, 2, 3, 4, 5]  # 1 pending + 5 draft rows
    assert len(a.block_table) == 3  # positions 6..11

    # the token budget caps the draft, leaving every other decode its one token
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=12)
    b, c = request(5, 16, t=1.0), request(5, 16, t=2.0)
    sched.add(b)
    sched.add(c)
    step(sched)  # both prompts and one token each
    sched.max_num_batched_tokens = 4
    b.draft_token_ids = [1, 2, 3, 4, 5]
    plan = sched.schedule()
    assert [(s.request_id, n) for s, n in plan.entries] == [(c.request_id, 1), (b.request_id, 3)]
    assert b.draft_token_ids == [1, 2]

    # no free block for the draft: none runs, and nothing is preempted for it
    d, e = request(7, 16, t=0.0), request(7, 16, t=1.0)
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(d)
    sched.add(e)
    step(sched)  # both prompts (2 blocks each) and one token each: 8 tokens, the pool is full
    d.draft_token_ids = [1, 2]
    plan = sched.schedule()
    assert not plan.preempted and [n for _, n in plan.entries] == [1, 1] and d.draft_token_ids == []
