"""`ThreadTuner`: the serving loop keeps the thread count whose steps measured faster."""
from __future__ import annotations

import pytest

from agentrt.engine.threads import ThreadTuner


def drive(tuner: ThreadTuner, cost: dict[int, float], steps: int) -> list[int]:
    """Run ``steps`` fake steps whose duration depends on the thread count; return the counts used."""
    used = []
    for _ in range(steps):
        threads = tuner.before_step()
        used.append(threads)
        tuner.after_step(cost[threads])
    return used


def test_a_contended_cpu_picks_one_thread_and_a_quiet_one_keeps_all():
    calls: list[int] = []
    tuner = ThreadTuner(2, calls.append, trial_steps=3, exploit_steps=10)
    used = drive(tuner, {2: 4.5, 1: 0.27}, 6)  # the trial: alternating, 3 steps each
    assert sorted(used) == [1, 1, 1, 2, 2, 2] and tuner.chosen == 1 and tuner.trials == 1
    assert drive(tuner, {2: 4.5, 1: 0.27}, 10) == [1] * 10  # exploit the winner
    # the load goes away: the next trial finds 2 threads faster and switches back
    drive(tuner, {2: 0.05, 1: 0.08}, 6)
    assert tuner.chosen == 2 and tuner.trials == 2
    assert drive(tuner, {2: 0.05, 1: 0.08}, 5) == [2] * 5
    # the same winner again and again: trials come ever less often (twice the wait each time)
    drive(tuner, {2: 0.05, 1: 0.08}, 5 + 6)  # rest of the window, then a trial: 2 wins again
    assert tuner.trials == 3 and drive(tuner, {2: 0.05, 1: 0.08}, 20) == [2] * 20
    assert calls and all(c in (1, 2) for c in calls)
    assert all(a != b for a, b in zip(calls, calls[1:]))  # set only when the count changes


def test_only_comparable_steps_decide_a_trial():
    tuner = ThreadTuner(2, lambda n: None, trial_steps=2, exploit_steps=10)
    # the 1-thread steps happen to carry prefill chunks (slow, not comparable): they must not count
    for _ in range(8):
        threads = tuner.before_step()
        tuner.after_step(9.0 if threads == 1 else 1.0, comparable=threads == 2)
    assert tuner.trials == 0  # still waiting for comparable 1-thread steps
    for _ in range(4):
        threads = tuner.before_step()
        tuner.after_step(0.3 if threads == 1 else 1.0)
    assert tuner.trials == 1 and tuner.chosen == 1
    # a trial that sees no comparable step for long is dropped: the last choice stays
    for _ in range(10):
        tuner.before_step()
        tuner.after_step(0.3)
    for _ in range(20 * 4 + 1):
        tuner.before_step()
        tuner.after_step(5.0, comparable=False)
    assert tuner.chosen == 1 and tuner.before_step() == 1


def test_one_thread_never_switches_and_bad_arguments_are_refused():
    calls: list[int] = []
    tuner = ThreadTuner(1, calls.append)
    assert drive(tuner, {1: 0.1}, 20) == [1] * 20 and calls == [] and tuner.trials == 0
    with pytest.raises(ValueError):
        ThreadTuner(0, calls.append)


async def test_the_async_engine_loop_drives_the_tuner():
    import torch

    from agentrt.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
    from tests.helpers.engine import tiny_loaded

    def make() -> LLMEngine:
        return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64, block_size=4), loaded=tiny_loaded())

    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = make().generate("tuned", params)[0]
    before = torch.get_num_threads()
    aeng = AsyncLLMEngine(make(), tune_threads=True)
    set_to: list[int] = []
    aeng.thread_tuner = ThreadTuner(2, set_to.append, trial_steps=2, exploit_steps=3)
    try:
        out = await aeng.generate("tuned", params)
    finally:
        aeng.shutdown()
    assert out.output_token_ids == ref.output_token_ids
    assert aeng.thread_tuner.trials >= 2 and 1 in set_to  # trials ran and switched counts
    assert set_to[-1] == 2  # the loop's end restored the count it started with
    assert torch.get_num_threads() == before  # the recording setter never touched torch here
    plain = AsyncLLMEngine(make(), tune_threads=False)
    plain.shutdown()
    assert plain.thread_tuner is None
