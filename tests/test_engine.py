"""Engine unit tests on a tiny random-weights Llama (fast; no real model needed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from agentrt.engine import AsyncLLMEngine, ContextOverflowError, EngineConfig, LLMEngine, SamplingParams
from tests.helpers.engine import tiny_loaded

torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared machine

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "hello",
    "abcdefghijklmnopqrstuvwxyz0123456789" * 2,
    "A somewhat different prompt that shares nothing.",
]


def make_engine(loaded=None, **cfg) -> LLMEngine:
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("num_kv_blocks", 128)
    cfg.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(**cfg), loaded=loaded or tiny_loaded())


async def wait_until_idle(eng: LLMEngine) -> None:
    """Wait (up to 2 s) for the loop thread to run the finished tails, then require every block free."""
    import anyio

    for _ in range(200):
        if eng.stats().kv_blocks_used == 0 and not eng.has_unfinished_requests():
            break
        await anyio.sleep(0.01)
    assert eng.stats().kv_blocks_used == 0


def hf_reference(loaded):
    """transformers' own Llama/Qwen2 on the same weights: the reference for logits."""
    import transformers

    cfg = dict(loaded.config)
    cls_cfg = transformers.Qwen2Config if cfg["model_type"] == "qwen2" else transformers.LlamaConfig
    cls_model = transformers.Qwen2ForCausalLM if cfg["model_type"] == "qwen2" else transformers.LlamaForCausalLM
    model = cls_model(cls_cfg(**cfg)).eval()
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("variant", [
    {},
    {"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": False},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
])
def test_logits_match_transformers_tiny(variant):
    loaded = tiny_loaded(**variant)
    # chunked prefill (max_num_batched_tokens=16) exercises attention to cached blocks too
    eng = make_engine(loaded, max_num_batched_tokens=16)
    ids = list(range(3, 83))
    ours = eng.prompt_logits(ids)  # [80, V]
    with torch.no_grad():
        ref = hf_reference(loaded)(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4  # fp32 vs fp32: only summation-order noise


def test_unsupported_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        make_engine(tiny_loaded(model_type="gpt2"))


def test_greedy_deterministic_and_length_finish():
    eng = make_engine()
    a = eng.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    b = eng.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert a.output_token_ids == b.output_token_ids
    assert len(a.output_token_ids) == 12 and a.finish_reason == "length" and a.finished


def _sequential(prompts, params, **cfg):
    eng = make_engine(enable_prefix_caching=False, **cfg)
    return [eng.generate(p, params)[0].output_token_ids for p in prompts]


def test_prefix_cache_hit_gives_identical_output_and_counts_cached_tokens():
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    eng = make_engine()
    first = eng.generate(PROMPTS[0], params)[0]
    assert first.metrics.cached_tokens == 0
    again = eng.generate(PROMPTS[0], params)[0]
    n = len(first.prompt_token_ids)
    assert again.metrics.cached_tokens == n - 1  # all but the last token (its logits are needed)
    assert again.output_token_ids == first.output_token_ids
    # a longer prompt extending prompt + output hits the generated tokens' blocks too
    ext = first.prompt_token_ids + first.output_token_ids + [65, 66, 67]
    third = eng.generate([ext], params)[0]
    assert third.metrics.cached_tokens >= (n + 10) // 4 * 4 - 4
    uncached = make_engine(enable_prefix_caching=False).generate([ext], params)[0]
    assert uncached.metrics.cached_tokens == 0
    assert third.output_token_ids == uncached.output_token_ids
    st = eng.stats()
    assert st.kv_blocks_used == 0 and st.prefix_cache_hit_tokens > 0


def test_concurrent_equals_sequential_with_chunked_prefill():
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    seq = _sequential(PROMPTS, params)
    eng = make_engine(max_num_batched_tokens=8, max_num_seqs=3)
    outs = eng.generate(PROMPTS, params)
    assert [o.output_token_ids for o in outs] == seq
    assert eng.stats().kv_blocks_used == 0


def test_tiny_pool_evicts_and_preempts_but_outputs_stay_exact():
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    seq = _sequential(PROMPTS, params)
    # 40 blocks of 4 tokens cannot hold all four requests at once: forces preemption + eviction
    eng = make_engine(num_kv_blocks=40)
    outs = eng.generate(PROMPTS, params)
    assert [o.output_token_ids for o in outs] == seq
    for _ in range(3):  # more traffic through the same tiny pool: LRU eviction of cached blocks
        outs = eng.generate(PROMPTS[::-1], params)
        assert [o.output_token_ids for o in outs] == seq[::-1]
    st = eng.stats()
    assert st.kv_blocks_used == 0 and st.kv_blocks_cached <= 40


def test_context_overflow_refused_before_work():
    eng = make_engine(max_model_len=64)
    with pytest.raises(ContextOverflowError, match="context window of 64"):
        eng.add_request("x" * 60, SamplingParams(max_tokens=10))
    assert not eng.has_unfinished_requests()
    small_pool = make_engine(num_kv_blocks=4)
    with pytest.raises(ContextOverflowError, match="KV pool"):
        small_pool.add_request("x" * 10, SamplingParams(max_tokens=10))


def test_abort_frees_blocks():
    eng = make_engine()
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.stats().kv_blocks_used > 0
    eng.abort_request(rid)
    assert eng.stats().kv_blocks_used == 0
    outs = eng.step()
    assert outs and outs[0].finish_reason == "abort" and outs[0].finished
    assert not eng.has_unfinished_requests()


def test_stop_strings_and_stop_tokens():
    eng = make_engine()
    base = eng.generate(PROMPTS[2], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    toks = base.output_token_ids
    # stop at the token that appears at index 5: generation ends there, finish "stop"
    out = eng.generate(PROMPTS[2], SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[toks[5]]))[0]
    k = toks.index(toks[5])
    assert out.finish_reason == "stop" and out.output_token_ids == toks[:k + 1]
    # stop string: the text of tokens 3..4 (bytes) cuts the text before it
    stop = bytes(toks[3:5]).decode("utf-8", errors="replace")
    out = eng.generate(PROMPTS[2], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[:base.text.find(stop)]
    assert stop not in out.text


def test_eos_stops_unless_ignored():
    loaded = tiny_loaded()
    eng = make_engine(loaded)
    first = eng.generate(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))[0].output_token_ids[0]
    loaded.eos_token_ids = [first]  # pretend the first greedy token is EOS
    eng2 = make_engine(loaded)
    out = eng2.generate(PROMPTS[1], SamplingParams(max_tokens=5))[0]
    assert out.finish_reason == "stop" and out.output_token_ids == [first] and out.text == ""
    out = eng2.generate(PROMPTS[1], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.output_token_ids) == 5


def test_seeded_sampling_is_reproducible():
    eng = make_engine()
    p = dict(max_tokens=24, temperature=20.0, ignore_eos=True)  # the tiny model is very peaked
    a = eng.generate(PROMPTS[1], SamplingParams(seed=7, **p))[0].output_token_ids
    b = eng.generate(PROMPTS[1], SamplingParams(seed=7, **p))[0].output_token_ids
    c = eng.generate(PROMPTS[1], SamplingParams(seed=8, **p))[0].output_token_ids
    assert a == b and a != c
    # top_k=1 is greedy whatever the temperature
    greedy = eng.generate(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_token_ids
    k1 = eng.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=1,
                                                 ignore_eos=True))[0].output_token_ids
    assert k1 == greedy


def test_top_p_keeps_only_the_nucleus():
    from agentrt.engine.sampling import sample_one

    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample_one(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(50)}
    assert picks <= {0, 1}
    picks = {sample_one(logits, SamplingParams(temperature=1.0, top_p=0.99), g) for _ in range(200)}
    assert picks == {0, 1}


class EvenThenForced:
    """Trivial constraint: a sampled token must be even; after every sampled token the
    constraint forces [65, 66]; it terminates after ``rounds`` sampled tokens."""

    def __init__(self, vocab: int, rounds: int = 3):
        self.vocab, self.rounds = vocab, rounds
        self.sampled: list[int] = []
        self.pending: list[int] = [70, 71]  # forced before the first sampled token
        self.accepted: list[int] = []

    def next_token_mask(self):
        m = torch.zeros(self.vocab, dtype=torch.bool)
        m[0:256:2] = True
        return m

    def accept_token(self, t):
        self.accepted.append(t)
        if self.pending:
            if t != self.pending[0]:
                raise ValueError(f"token {t} not allowed")
            self.pending.pop(0)
            return
        if t % 2:
            raise ValueError(f"odd token {t}")
        self.sampled.append(t)
        self.pending = [65, 66]

    def forced_tokens(self):
        return list(self.pending)

    def is_terminated(self):
        return len(self.sampled) >= self.rounds and not self.pending


def test_constraint_hook_masks_forces_and_terminates():
    eng = make_engine()
    c = EvenThenForced(eng.vocab_size)
    steps = 0
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True), constraint=c)
    final, final_step = None, None
    while eng.has_unfinished_requests():
        steps += 1
        for o in eng.step():
            if o.request_id == rid and o.finished:
                final, final_step = o, steps
    out = final.output_token_ids
    assert out[:2] == [70, 71]
    assert len(out) == 2 + 3 * 3 and out[2::3] == c.sampled and all(t % 2 == 0 for t in c.sampled)
    assert out[3::3] == [65] * 3 and out[4::3] == [66] * 3
    assert final.finish_reason == "stop" and final.metrics.forced_tokens == 2 + 2 * 3
    # one step per sampled token (forced runs ride along as prefill chunks); the output is delivered
    # at once, and one more step computes the finished tail (last sampled + forced) for the cache
    assert final_step == 3 and steps == 4
    assert eng.stats().kv_blocks_used == 0


def test_constraint_mask_width_checked():
    class Bad(EvenThenForced):
        def next_token_mask(self):
            return torch.ones(10, dtype=torch.bool)

    eng = make_engine()
    with pytest.raises(ValueError, match="logits width"):
        eng.generate(PROMPTS[1], SamplingParams(max_tokens=5), constraints=[Bad(eng.vocab_size)])


def test_block_manager_refcounts_and_lru():
    from agentrt.engine.kv_cache import BlockManager
    from agentrt.engine.sequence import Sequence

    bm = BlockManager(num_blocks=4, block_size=2)

    def seq(toks):
        return Sequence(request_id=str(toks), token_ids=list(toks), num_prompt_tokens=len(toks),
                        params=SamplingParams())

    a = seq([1, 2, 3, 4, 5])
    bm.match_prefix(a)
    bm.grow(a, 5)
    a.num_computed_tokens = 5
    bm.commit_full_blocks(a)
    assert bm.num_used == 3 and bm.num_cached == 2
    b = seq([1, 2, 3, 4, 9])
    assert bm.match_prefix(b) == 4  # shares both full blocks
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free(a)
    assert bm.num_used == 2  # shared blocks survive a's release
    bm.free(b)
    assert bm.num_used == 0 and bm.num_cached == 2
    # filling the pool evicts cached blocks, the tail (3,4) before the head (1,2)
    c = seq([7, 7, 7, 7, 7, 7, 7])
    bm.match_prefix(c)
    bm.grow(c, 6)
    assert bm.num_cached == 1 and bm.match_prefix(seq([1, 2, 3, 4, 5])) == 2


async def test_async_stream_deltas_and_cancellation_free_blocks():
    import anyio

    eng = make_engine()
    aeng = AsyncLLMEngine(eng)
    try:
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        ref = eng_ref = make_engine().generate(PROMPTS[2], params)[0]
        text, n = "", 0
        async for out in aeng.generate_stream(PROMPTS[2], params):
            text += out.delta_text
            n += 1
        assert out.finished and out.output_token_ids == eng_ref.output_token_ids and text == ref.text
        assert n >= 2

        with pytest.raises(ContextOverflowError):
            aeng.generate_stream("x" * 10, SamplingParams(max_tokens=10_000))

        # concurrent requests through the background loop equal the sequential ones
        seq = _sequential(PROMPTS, params)
        results = {}

        async def one(i):
            results[i] = (await aeng.generate(PROMPTS[i], params)).output_token_ids

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        assert [results[i] for i in range(len(PROMPTS))] == seq

        # breaking out early aborts the request and frees its blocks
        stream = aeng.generate_stream(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.output_token_ids) >= 2:
                break
        await stream.aclose()
        await wait_until_idle(eng)

        # cancellation from outside (timeout) does the same
        with anyio.move_on_after(0.2):
            await aeng.generate(PROMPTS[0], SamplingParams(max_tokens=300, ignore_eos=True))
        await wait_until_idle(eng)
    finally:
        aeng.shutdown()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_decodes_close_to_fp32(mode):
    from agentrt.engine.model import DecodeQuantLinear

    loaded = tiny_loaded()
    ref = make_engine(loaded)
    eng = make_engine(loaded, quantization=mode)
    assert isinstance(eng.model.layers[0].qkv_proj, DecodeQuantLinear)
    # decode reads the quantized copies only: int8 is about a quarter of fp32's bytes (plus scales)
    assert eng.decode_weight_bytes() < ref.decode_weight_bytes() / 3
    ids = list(range(3, 83))
    # chunks of 8 rows run the quantized kernels; top-1 must mostly agree with fp32
    a, b = ref.prompt_logits(ids), eng.prompt_logits(ids, chunk_size=8)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    # big chunks take the dense prefill weights (a different path; only the int8 lm_head differs from fp32)
    dense = eng.prompt_logits(ids, chunk_size=80)
    assert not torch.equal(dense, b)
    assert (dense.argmax(-1) == a.argmax(-1)).float().mean().item() >= 0.9
    out = eng.generate(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 8 and eng.stats().kv_blocks_used == 0


def test_real_valued_rope_equals_complex_rope():
    eng = make_engine()
    ids = list(range(3, 40))
    a = eng.prompt_logits(ids)
    eng.model.rope_real = True  # the form used under torch.compile
    b = eng.prompt_logits(ids)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.e2e
def test_compiled_decode_matches_eager():
    pytest.importorskip("torch._inductor", reason="torch.compile needs inductor")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    eager = make_engine().generate(PROMPTS[:2], params)
    compiled = make_engine(compile=True).generate(PROMPTS[:2], params)
    assert [o.output_token_ids for o in compiled] == [o.output_token_ids for o in eager]


async def test_failing_constraint_fails_only_its_request():
    class Refuses(EvenThenForced):
        def __init__(self, vocab):
            super().__init__(vocab)
            self.pending = []

        def accept_token(self, t):
            raise ValueError("constraint refuses everything")

    eng = make_engine()
    aeng = AsyncLLMEngine(eng)
    try:
        params = SamplingParams(max_tokens=10, ignore_eos=True)
        good = aeng.generate(PROMPTS[0], params)
        bad = aeng.generate(PROMPTS[1], params, constraint=Refuses(eng.vocab_size))
        import asyncio

        res = await asyncio.gather(good, bad, return_exceptions=True)
        assert len(res[0].output_token_ids) == 10
        assert isinstance(res[1], ValueError) and "refuses" in str(res[1])
        # the good request's finished tail is computed by the loop's next step, then all is free
        await wait_until_idle(eng)
    finally:
        aeng.shutdown()


def test_consecutive_blocks_attend_through_views_with_the_gather_logits():
    eng = make_engine()
    ids = list(range(3, 40))
    seq = eng.make_sequence(ids, SamplingParams(max_tokens=1))
    eng.block_manager.grow(seq, len(ids))
    try:
        seq.num_computed_tokens = len(ids) - 1
        _, _, meta = eng.runner.eager.metadata(eng.runner.prepare([(seq, 1)]))
        assert isinstance(meta.decode_slots, slice)  # a fresh pool hands out consecutive blocks
        seq.num_computed_tokens = 0
        _, _, meta = eng.runner.eager.metadata(eng.runner.prepare([(seq, len(ids))]))
        assert isinstance(meta.prefills[0][2], slice)
    finally:
        eng.block_manager.free(seq)
    views = eng.prompt_logits(ids, chunk_size=1)  # every chunk a one-token decode
    views_prefill = eng.prompt_logits(ids, chunk_size=8)
    eng.runner.eager.kv_views = False  # the gather path
    gather = eng.prompt_logits(ids, chunk_size=1)
    gather_prefill = eng.prompt_logits(ids, chunk_size=8)
    assert (views - gather).abs().max().item() < 1e-5
    assert (views_prefill - gather_prefill).abs().max().item() < 1e-5


def test_scattered_blocks_gather_and_stay_exact():
    """Blocks taken out of order (a fragmented pool) fall back to the gather; outputs unchanged."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ref = make_engine().generate(PROMPTS[0], params)[0].output_token_ids
    eng = make_engine()
    free = eng.block_manager._free_plain
    free.rotate(3)
    free.reverse()  # the next blocks handed out are descending: never consecutive
    seq = eng.make_sequence(PROMPTS[0], params)
    eng.block_manager.grow(seq, len(seq.token_ids) + 1)
    seq.num_computed_tokens = len(seq.token_ids) - 1
    _, _, meta = eng.runner.eager.metadata(eng.runner.prepare([(seq, 1)]))
    assert isinstance(meta.decode_slots, torch.Tensor)
    eng.block_manager.free(seq)
    free.clear()
    free.extend(range(eng.block_manager.num_blocks - 1, -1, -1))
    assert eng.generate(PROMPTS[0], params)[0].output_token_ids == ref


class _SentencePieceLike:
    """Decodes like SentencePiece: a word token carries its leading space, dropped at the start of a decode."""

    words = ["▁hello", "▁wor", "ld", "▁é", "t", "é", "▁!"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.words[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_incremental_detokenizer_equals_full_decode():
    from agentrt.engine.detokenize import IncrementalDetokenizer
    from tests.helpers.engine import ByteTokenizer

    tok = ByteTokenizer()
    ids = list("naïve café — 日本語 🙂 ok".encode("utf-8"))  # 2-, 3- and 4-byte characters, one byte per token
    d = IncrementalDetokenizer(tok)
    for n in range(1, len(ids) + 1):
        text = d.update(ids[:n])
        assert "\ufffd" not in text and tok.decode(ids[:n]).startswith(text)
    assert d.flush(ids) == tok.decode(ids)
    partial = list("x🙂".encode("utf-8"))[:-1]  # a character cut short at the end
    d2 = IncrementalDetokenizer(tok)
    assert d2.update(partial[:1]) == "x" and d2.update(partial) == "x"  # the partial character waits
    assert d2.flush(partial) == tok.decode(partial)  # ... and shows as a full decode shows it at the end
    sp = _SentencePieceLike()
    d3 = IncrementalDetokenizer(sp)
    seq = [0, 1, 2, 3, 4, 5, 6]
    for n in range(1, len(seq) + 1):
        assert d3.update(seq[:n]) == sp.decode(seq[:n])  # spaces between words survive the windows


def test_engine_text_with_multibyte_tokens_and_stop_string():
    """The engine's incremental text equals one full decode, and a stop string cuts it, both when the
    output is made of multi-byte characters split over tokens (forced by a constraint)."""
    text = "café 🙂 done. après"
    forced = list(text.encode("utf-8"))

    class Forces:  # forces the whole text at admission, then is done
        def __init__(self):
            self.accepted = 0

        def is_terminated(self):
            return self.accepted == len(forced)

        def next_token_mask(self):
            return torch.ones(260, dtype=torch.bool)

        def accept_token(self, t):
            self.accepted += 1

        def forced_tokens(self):
            return forced[self.accepted:]

    eng = make_engine()
    out = eng.generate("hi", SamplingParams(max_tokens=64, ignore_eos=True), constraints=[Forces()])[0]
    assert out.output_token_ids == forced and out.text == text
    out = eng.generate("hi", SamplingParams(max_tokens=64, ignore_eos=True, stop=["🙂 d"]),
                       constraints=[Forces()])[0]
    assert out.text == "café " and out.finish_reason == "stop"


def test_decode_graph_step_equals_forward_step():
    """The pure decode step torch.compile traces (run eager here: same math, no compile cost) gives the
    forward path's tokens for a batch of different context lengths, and writes the same K/V."""
    from agentrt.engine.step_backends import CompiledDecodeBackend

    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ref_eng = make_engine()
    ref = ref_eng.generate(PROMPTS[:3], params)
    eng = make_engine()
    calls = []
    graph = CompiledDecodeBackend(eng.model, eng.kv, eng.config.block_size,
                                  graph=lambda *a: calls.append(a[0].shape[0]) or eng.model.decode_graph(*a))
    eng.runner.backends.insert(0, graph)
    seq = eng.make_sequence(PROMPTS[1], params)
    eng.add_sequence(seq)
    eng.step()  # prefill
    got = graph.prepare(eng.runner.prepare([(seq, 1)]))
    assert got[3].shape == (1, 128) and got[4].shape == (1, 1, 1, 129)  # context bucketed to 128
    outs = eng.generate(PROMPTS[:3], params)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in ref]
    assert 3 in calls  # the three sequences decoded together through the graph


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_sample_the_best_token(temperature):
    """Any temperature > 0 samples: tiny ones used to overflow logits / T to inf and make softmax nan,
    and torch.multinomial raised (a 500 that also cut every stream in the same batch)."""
    from agentrt.engine.sampling import sample_one

    logits = torch.tensor([1.0, 3.0, 2.0, float("-inf")])
    g = torch.Generator().manual_seed(0)
    assert {sample_one(logits, SamplingParams(temperature=temperature, top_p=0.9, top_k=2), g)
            for _ in range(20)} == {1}
    eng = make_engine()
    greedy = eng.generate(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_token_ids
    tiny = eng.generate(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True, temperature=temperature,
                                                   seed=2**64 - 1))[0].output_token_ids
    assert tiny == greedy


def test_sampling_params_refuse_what_the_sampler_cannot_use():
    for bad, what in [(dict(temperature=float("nan")), "temperature=nan"),
                      (dict(temperature=float("inf")), "temperature=inf"),
                      (dict(seed=2**64), "seed=18446744073709551616"),
                      (dict(seed=-(2**63) - 1), "must fit in 64 bits"),
                      (dict(stop=[""]), "non-empty")]:
        with pytest.raises(ValueError, match=what):
            SamplingParams(**bad)


async def test_a_sampler_failure_fails_only_its_request(monkeypatch):
    """One request whose sampling raises ends alone with that error; the request beside it in the same
    batch runs on and produces exactly its solo output."""
    import asyncio

    from agentrt.engine import sampling

    real_sample = sampling.sample

    def poisoned(logits, params, generators):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("poisoned sampler")
        return real_sample(logits, params, generators)

    eng = make_engine()
    good_params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=1)
    solo = eng.generate(PROMPTS[0], good_params)[0].output_token_ids
    monkeypatch.setattr(sampling, "sample", poisoned)
    aeng = AsyncLLMEngine(eng)
    try:
        bad = aeng.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.8, seed=666))
        good = aeng.generate(PROMPTS[0], good_params)
        res = await asyncio.gather(good, bad, return_exceptions=True)
        assert isinstance(res[1], RuntimeError) and "poisoned" in str(res[1])
        assert res[0].output_token_ids == solo and res[0].finish_reason == "length"
        await wait_until_idle(eng)
    finally:
        aeng.shutdown()


def test_kv_cache_gb_sizes_the_pool():
    """kv_cache_gb is the pool's memory; below one full context it is still honored (a longer request is
    then refused by name); nonsense is refused when the config is built."""
    small = make_engine(num_kv_blocks=None, kv_cache_gb=0.0002)
    bs = small.block_manager.block_size
    assert small.kv.k.nbytes + small.kv.v.nbytes <= 0.0002e9 + 2 * small.kv.k[:, :bs].nbytes  # one block over, at most
    capacity = small.block_manager.num_blocks * bs
    assert capacity < small.max_model_len
    with pytest.raises(ContextOverflowError, match="KV pool"):
        small.make_sequence(list(range(3, 40)), SamplingParams(max_tokens=capacity))
    big = make_engine(num_kv_blocks=None, kv_cache_gb=0.002)
    assert big.block_manager.num_blocks > 3 * small.block_manager.num_blocks
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kv_cache_gb"):
            EngineConfig(kv_cache_gb=bad)


def test_building_an_engine_does_not_import_torch_dynamo():
    """torch._dynamo is torch.compile's (with sympy and mpmath: ~900 modules, ~100 MB of RSS and a second of
    start-up); an nn.Embedding initialized on the meta device imported it. Checked in a fresh process."""
    code = ("import sys\n"
            "from agentrt.engine import EngineConfig, LLMEngine\n"
            "from tests.helpers.engine import tiny_loaded\n"
            "for kw in ({'quantization': 'int4', 'fused_decode': True}, {'quantization': None}):\n"
            "    LLMEngine(EngineConfig(dtype='float32', num_kv_blocks=8, **kw), loaded=tiny_loaded())\n"
            "    assert 'torch._dynamo' not in sys.modules, kw\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
