"""KV held through tool calls: a finished request with a cache key keeps its blocks pinned for the key's
next request, so a crowded pool evicts other cached blocks first; pins go when the next request is
admitted, when released, after their TTL, and before any request would wait for blocks."""
from __future__ import annotations

import random
import time

import torch

from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
from agentrt.engine.kv_cache import BlockManager
from tests.helpers.engine import tiny_loaded

torch.set_num_threads(1)
PARAMS = SamplingParams(max_tokens=7, ignore_eos=True)


def engine(**cfg) -> LLMEngine:
    cfg = {"dtype": "float32", "num_kv_blocks": 12, "block_size": 8, "max_num_batched_tokens": 128, **cfg}
    return LLMEngine(EngineConfig(**cfg), loaded=tiny_loaded())


def generate(eng: LLMEngine, prompt: list[int], key: str | None = None) -> object:
    """One request to its end (and its tail into the cache), with ``key`` as its cache key."""
    seq = eng.make_sequence(prompt, PARAMS)
    seq.cache_key = key
    rid = eng.add_sequence(seq)
    final = None
    while final is None or eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid and out.finished:
                final = out
    return final


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def run_then_crowd(eng: LLMEngine) -> tuple[int, int]:
    """A run's step, other work that needs half the pool twice, then the run's next step:
    (the next step's cached tokens, the tokens it could have been served)."""
    step1 = tokens(40, 0)
    out = generate(eng, step1, key="run-1")
    for seed in (1, 2):  # 40 + 7 tokens: 6 of the 12 blocks each
        generate(eng, tokens(40, seed))
    step2 = step1 + out.output_token_ids + tokens(5, 9)
    served = len(step1) + len(out.output_token_ids)
    return generate(eng, step2, key="run-1").metrics.cached_tokens, served


def test_a_pinned_run_keeps_its_prefix_through_a_crowd_and_unpinned_it_is_evicted():
    pinned, served = run_then_crowd(engine())
    unpinned, _ = run_then_crowd(engine(kv_pin_ttl_s=0))
    assert pinned == served
    assert unpinned < served // 2  # LRU evicted the run's blocks for the crowd


def test_the_next_step_takes_over_the_pin_and_the_release_ends_it():
    eng = engine()
    out = generate(eng, tokens(30, 0), key="run-1")
    assert eng.stats().kv_blocks_pinned == 5  # 37 tokens: 5 blocks of 8
    out = generate(eng, tokens(30, 0) + out.output_token_ids + [1, 2, 3], key="run-1")
    assert eng.stats().kv_blocks_pinned == 6  # the old pin went at admission; the new one holds 47 tokens
    eng.block_manager.unpin("run-1")
    assert eng.stats().kv_blocks_pinned == 0 and eng.stats().kv_blocks_used == 0


def test_pins_never_make_a_request_wait():
    eng = engine()
    for i in range(2):
        generate(eng, tokens(40, i), key=f"run-{i}")  # 12 of 12 blocks pinned
    assert eng.stats().kv_blocks_pinned == 12
    started = time.perf_counter()
    out = generate(eng, tokens(80, 5))  # needs 11 blocks: the pins give way
    assert out.finish_reason == "length" and time.perf_counter() - started < 30
    assert eng.block_manager.pins_released_early == 2


def test_pins_expire_after_their_ttl():
    eng = engine(kv_pin_ttl_s=0.05)
    generate(eng, tokens(30, 0), key="run-1")
    assert eng.stats().kv_blocks_pinned == 5
    time.sleep(0.1)
    eng.block_manager.expire_pins()
    assert eng.stats().kv_blocks_pinned == 0


def test_block_manager_pins_are_reference_counted_with_shared_blocks():
    bm = BlockManager(4, 4, pin_ttl_s=10)
    held = [bm._take_free() for _ in range(3)]  # a sequence's blocks
    bm.pin("a", held[:2])
    bm.pin("b", held[1:])  # the middle block is held by both pins
    for bid in held:
        bm._unref(bid)  # the sequence is released
    assert bm.num_pinned == 3 and bm.num_free == 1
    bm.unpin("a")
    assert bm.blocks[held[1]].ref_count == 1 and bm.num_free == 2
    bm.pin("b", [])  # a key's new pin replaces its old one
    assert bm.num_pinned == 0 and bm.num_free == 4
    assert not BlockManager(4, 4, enable_prefix_caching=False, pin_ttl_s=10).pin_ttl_s  # no cache, no pins


def test_a_release_while_the_last_step_finishes_leaves_nothing_pinned():
    eng = engine()
    seq = eng.make_sequence(tokens(30, 0), PARAMS)
    seq.cache_key = "run-1"
    eng.add_sequence(seq)
    while not seq.finished:
        eng.step()
    assert eng.scheduler.finishing == [seq]  # its last tokens' K/V are still to compute
    eng.release_cache_key("run-1")  # the run ended: it will not come back
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats().kv_blocks_pinned == 0 and eng.stats().kv_blocks_used == 0


def test_pinned_blocks_are_not_counted_as_used():
    eng = engine()
    generate(eng, tokens(30, 0), key="run-1")  # e.g. a client's prompt_cache_key, never sent again
    stats = eng.stats()
    assert stats.kv_blocks_pinned == 5 and stats.kv_blocks_used == 0  # held for reuse, given up on demand
