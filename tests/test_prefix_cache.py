"""Token-granular prefix reuse: a released sequence's partial last block is served by copy.

Unit tests drive `BlockManager` with a recording copy function; engine tests run the tiny
random-weights Llama and compare cached against uncached greedy outputs token for token.
"""
from __future__ import annotations

import random

import torch

from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
from agentrt.engine.kv_cache import BlockManager, KVCache
from agentrt.engine.sequence import Sequence
from tests.helpers.engine import tiny_loaded

torch.set_num_threads(1)


def seq(tokens) -> Sequence:
    return Sequence(request_id=str(tokens), token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    params=SamplingParams())


def run(bm: BlockManager, s: Sequence, computed: int | None = None) -> int:
    """Admit ``s``, 'compute' it up to ``computed`` tokens (default all), index its full blocks."""
    cached = bm.match_prefix(s)
    n = len(s.token_ids) if computed is None else computed
    bm.grow(s, n)
    s.num_computed_tokens = n
    bm.commit_full_blocks(s)
    return cached


def manager(num_blocks=8, block_size=4):
    copies: list[tuple[int, int, int]] = []
    bm = BlockManager(num_blocks, block_size, copy_kv=lambda src, dst, n: copies.append((src, dst, n)))
    return bm, copies


def check_index(bm: BlockManager) -> None:
    """Every index entry points at a block that says so; free lists and refcounts agree."""
    for h, bid in bm.hash_to_block.items():
        assert bm.blocks[bid].hash == h
    listed = {bid for kids in bm.children.values() for bid in kids}
    assert listed == {b.block_id for b in bm.blocks if b.parent is not None}
    for (parent, first), kids in bm.children.items():
        assert kids and all(bm.blocks[b].parent == parent and bm.blocks[b].tokens[0] == first for b in kids)
    free = set(bm._free_plain) | set(bm._free_cached)
    assert free == {b.block_id for b in bm.blocks if b.ref_count == 0}
    assert all(bm.blocks[b].parent is not None for b in bm._free_cached)


def test_partial_last_block_is_copied_into_a_fresh_block():
    bm, copies = manager()
    a = seq(range(10))  # blocks [0..3] [4..7] and a partial [8, 9]
    run(bm, a)
    a_partial = a.block_table[2]
    bm.free(a)
    assert bm.num_partial_cached == 1 and bm.num_used == 0
    b = seq(list(range(10)) + [50, 51, 52])
    assert bm.match_prefix(b) == 10  # 2 full blocks + the 2 tokens of the partial one
    assert copies == [(a_partial, b.block_table[2], 2)]
    assert b.block_table[2] != a_partial and bm.blocks[a_partial].ref_count == 0  # source not kept
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    check_index(bm)
    bm.free(b)
    assert bm.num_used == 0
    check_index(bm)


def test_divergence_inside_the_block_reuses_the_common_prefix_only():
    bm, copies = manager()
    a = seq([1, 2, 3, 4, 5, 6, 7])
    run(bm, a)
    bm.free(a)  # partial [5, 6, 7] under block (1, 2, 3, 4)
    assert bm.match_prefix(seq([1, 2, 3, 4, 5, 9, 9, 9])) == 5
    assert copies[-1][2] == 1
    # a full block that diverges midway is reused up to the divergence as well
    c = seq([1, 2, 9, 9, 9])
    assert bm.match_prefix(c) == 2 and copies[-1][2] == 2
    # at least one token is left to compute: an identical prompt stops one short
    assert bm.match_prefix(seq([1, 2, 3, 4, 5, 6, 7])) == 6


def test_without_copy_or_with_caching_off_matches_stop_at_full_blocks():
    for bm in (BlockManager(8, 4), BlockManager(8, 4, enable_prefix_caching=False, copy_kv=lambda *a: None)):
        a = seq(range(10))
        run(bm, a)
        bm.free(a)
        expect = 8 if bm.enable_prefix_caching else 0
        assert bm.match_prefix(seq(range(12))) == expect


def test_evicted_partial_block_is_no_longer_matched_and_a_full_pool_skips_the_copy():
    bm, copies = manager(num_blocks=3)
    a = seq(range(6))
    run(bm, a)
    bm.free(a)  # cached: the partial (4, 5) (least recent: freed first) and the full (0..3); 1 plain
    hog = seq([90 + i for i in range(8)])
    run(bm, hog)  # takes the plain block and evicts the partial one
    assert bm.num_partial_cached == 0 and bm.num_cached == 3  # a's full block and hog's two
    bm.free(hog)
    check_index(bm)
    assert bm.match_prefix(seq(range(8))) == 4 and not copies

    bm, copies = manager(num_blocks=2)
    a = seq(range(6))
    run(bm, a)
    bm.free(a)
    b = seq(range(8))
    # the full block is shared; the only other block is the partial source itself: no copy
    assert bm.match_prefix(b) == 4 and not copies and bm.num_partial_cached == 1
    check_index(bm)
    bm.free(b)
    assert bm.num_used == 0


def test_a_copied_block_is_not_indexed_twice_and_preemption_reindexes():
    bm, copies = manager()
    a = seq(range(6))
    run(bm, a)
    bm.free(a)
    b = seq(range(9))
    run(bm, b, computed=6)  # copied 2 tokens, computed nothing more (e.g. preempted at once)
    bm.free(b)
    assert bm.num_partial_cached == 1  # b's copy holds the same tokens as a's partial block
    c = seq(range(9))
    run(bm, c, computed=7)
    bm.free(c)  # c's partial (4, 5, 6) extends a's (4, 5): both listed; the longer one wins
    assert bm.num_partial_cached == 2
    assert bm.match_prefix(seq(range(9))) == 7
    check_index(bm)


def test_kv_cache_copy_block_prefix_copies_only_the_prefix():
    kv = KVCache(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    kv.k.copy_(torch.arange(kv.k.numel(), dtype=torch.float32).view_as(kv.k))
    kv.v.copy_(-kv.k)
    before = kv.k.clone()
    kv.copy_block_prefix(0, 2, 3)
    assert torch.equal(kv.k[:, 8:11], before[:, 0:3]) and torch.equal(kv.v[:, 8:11], -before[:, 0:3])
    assert torch.equal(kv.k[:, 11], before[:, 11]) and torch.equal(kv.k[:, :8], before[:, :8])


# ---- on the tiny model ----------------------------------------------------------------------------
def make_engine(**cfg) -> LLMEngine:
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("num_kv_blocks", 128)
    cfg.setdefault("block_size", 8)
    return LLMEngine(EngineConfig(**cfg), loaded=tiny_loaded())


def agent_chain(eng: LLMEngine, steps: int, params: SamplingParams, seed: int = 0):
    """Each step's prompt = the previous prompt + its output + some new 'tool result' tokens."""
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(37)]
    outs = []
    for _ in range(steps):
        out = eng.generate([prompt], params)[0]
        outs.append(out)
        prompt = prompt + out.output_token_ids + [rng.randrange(256) for _ in range(rng.randrange(3, 12))]
    return outs


def test_agent_chain_cached_equals_uncached_and_serves_every_computed_token():
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    cached = agent_chain(make_engine(), 5, params)
    plain = agent_chain(make_engine(enable_prefix_caching=False), 5, params)
    assert [o.output_token_ids for o in cached] == [o.output_token_ids for o in plain]
    for prev, out in zip(cached, cached[1:]):
        # every token of the previous step, its last sampled token too (its K/V was computed after it finished)
        assert out.metrics.cached_tokens == len(prev.prompt_token_ids) + len(prev.output_token_ids)
    assert all(o.metrics.cached_tokens == 0 for o in plain)


def prefill_kv(eng: LLMEngine, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [layers, len(prompt), n_kv, head_dim] the engine holds for ``prompt`` once prefilled."""
    s = eng.make_sequence(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    eng.add_sequence(s)
    eng.step()  # the whole prompt fits one step's token budget
    bs = eng.block_manager.block_size
    slots = torch.tensor([s.block_table[i // bs] * bs + i % bs for i in range(len(prompt))])
    kv = eng.kv.k[:, slots].clone(), eng.kv.v[:, slots].clone()
    while eng.has_unfinished_requests():
        eng.step()
    return kv


def test_copied_kv_equals_recomputed_kv():
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    eng = make_engine()
    outs = agent_chain(eng, 2, params)
    prompt = outs[-1].prompt_token_ids + outs[-1].output_token_ids + [7, 8, 9]
    copies = []
    inner = eng.block_manager.copy_kv
    eng.block_manager.copy_kv = lambda *a: (copies.append(a), inner(*a))
    k, v = prefill_kv(eng, prompt)
    assert copies and copies[0][2] > 0  # the partial block was reused
    k_ref, v_ref = prefill_kv(make_engine(enable_prefix_caching=False), prompt)
    torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)


def test_thousand_requests_tiny_pool_leave_no_block_referenced():
    # 12 blocks of 8 tokens: 4 concurrent requests of up to 70 tokens do not fit, so requests
    # are preempted as they grow, and cached blocks (full and partial) are evicted all along.
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    eng = make_engine(num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=64)
    rng = random.Random(1)
    stems = [[rng.randrange(256) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    prompts = [rng.choice(stems) + [rng.randrange(256) for _ in range(rng.randrange(1, 20))] for _ in range(1000)]
    preempted, copies = [], []
    preempt, copy = eng.scheduler._preempt, eng.block_manager.copy_kv
    eng.scheduler._preempt = lambda s: (preempted.append(s), preempt(s))
    eng.block_manager.copy_kv = lambda *a: (copies.append(a), copy(*a))
    outs = []
    for i in range(0, len(prompts), 50):
        outs += eng.generate([[*p] for p in prompts[i:i + 50]], params)
    bm = eng.block_manager
    assert eng.stats().kv_blocks_used == 0 and all(b.ref_count == 0 for b in bm.blocks)
    check_index(bm)
    assert preempted and len(copies) > 100 and bm.hit_tokens > 0  # the paths under test did run
    # exactness under all that churn, on a sample checked against a cache-free engine
    ref = make_engine(enable_prefix_caching=False)
    sample = rng.sample(range(len(prompts)), 40)
    assert [outs[i].output_token_ids for i in sample] == [o.output_token_ids for o in ref.generate(
        [prompts[i] for i in sample], params)]


class SampleThenClose:
    """A constraint like a JSON grammar's end: ``k`` free tokens, then a forced closing run
    (jump-forward, e.g. ``"}}]}``), then terminated."""

    def __init__(self, vocab: int, k: int = 4, closing: tuple[int, ...] = (34, 125, 125, 93, 125)):
        self.vocab, self.k, self.closing = vocab, k, closing
        self.sampled = 0
        self.pending: list[int] = []

    def next_token_mask(self):
        m = torch.zeros(self.vocab, dtype=torch.bool)
        m[:256] = True
        return m

    def accept_token(self, t):
        if self.pending:
            assert t == self.pending.pop(0)
            return
        self.sampled += 1
        if self.sampled == self.k:
            self.pending = list(self.closing)

    def forced_tokens(self):
        return list(self.pending)

    def is_terminated(self):
        return self.sampled >= self.k and not self.pending


def test_finished_tail_is_computed_after_the_output_and_served_to_the_next_prompt():
    # Guarantee: a prompt that extends a finished request's prompt + output (and is longer) is
    # served every one of those tokens from the cache, exactly, whatever the block size; the
    # tail (last sampled token + forced closing run) is computed by the step after the output.
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    rng = random.Random(3)
    prompt = [rng.randrange(256) for _ in range(29)]
    eng = make_engine()
    k = 4
    eng.add_request(prompt, params, constraint=SampleThenClose(eng.vocab_size, k))
    final, steps = None, 0
    while final is None:
        steps += 1
        final = next((o for o in eng.step() if o.finished), None)
    assert steps == k  # delivered in the step that sampled the last token: not delayed by the tail
    assert final.output_token_ids[-5:] == [34, 125, 125, 93, 125] and final.metrics.forced_tokens == 5
    st = eng.stats()
    assert st.finishing == 1 and st.kv_blocks_used > 0 and eng.has_unfinished_requests()

    # the next step's prompt arrives before the tail is computed: it waits one step for it
    nxt = final.prompt_token_ids + final.output_token_ids + [rng.randrange(256) for _ in range(6)]
    out2 = eng.generate([nxt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out2.metrics.cached_tokens == len(prompt) + len(final.output_token_ids)
    assert eng.stats().kv_blocks_used == 0 and eng.stats().finishing == 0

    # exact: the same two requests on a cache-free engine
    ref = make_engine(enable_prefix_caching=False)
    ref_final = ref.generate([prompt], params, [SampleThenClose(ref.vocab_size, k)])[0]
    assert ref_final.output_token_ids == final.output_token_ids
    assert ref.stats().finishing == 0  # nothing to keep without a prefix cache
    ref_out2 = ref.generate([nxt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert ref_out2.output_token_ids == out2.output_token_ids and ref_out2.metrics.cached_tokens == 0


def test_abort_frees_at_once_and_length_finishes_keep_their_tail():
    eng = make_engine()
    rid = eng.add_request(list(range(40, 70)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    eng.abort_request(rid)  # no step needed: an aborted request keeps nothing
    assert eng.stats().kv_blocks_used == 0 and eng.stats().finishing == 0
    assert [o.finish_reason for o in eng.step()] == ["abort"] and not eng.has_unfinished_requests()

    out = eng.generate([list(range(40, 70))], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    nxt = out.prompt_token_ids + out.output_token_ids + [1, 2]
    assert eng.generate([nxt], SamplingParams(max_tokens=1))[0].metrics.cached_tokens == len(nxt) - 2
