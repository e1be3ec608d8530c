"""Prompt-lookup speculation (`engine.speculation`): greedy output is token-identical with it on
and off, on the embedded model, with and without a JSON grammar; a draft the grammar refuses is
never run; the draft's K/V that is kept serves later prompts from the prefix cache exactly."""
from __future__ import annotations

import json
import tempfile

import jsonschema
import pytest

from agentrt.benchmarks.grammar import bfcl_cases_with_ids
from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher
from agentrt.engine.sequence import Sequence
from agentrt.engine.speculation import draft_for, propose_draft


# ---- the proposer -----------------------------------------------------------------------------------
def test_the_latest_occurrence_of_the_longest_tail_gives_the_draft():
    tokens = [5, 6, 7, 1, 2, 9, 9, 6, 7, 3, 4, 8, 5, 6, 7]
    # tail [5, 6, 7] occurs at 0 only: what followed it there
    assert propose_draft(tokens, 3, 2, 3) == [1, 2, 9]
    # with n = 2 only, [6, 7] occurs last at 7: its continuation wins over the older one
    assert propose_draft(tokens, 3, 2, 2) == [3, 4, 8]
    assert propose_draft(tokens, 1, 2, 2) == [3]
    assert propose_draft([1, 2, 3, 4], 4, 2, 3) == []  # the tail never occurred before
    assert propose_draft([1, 2, 1, 2], 4, 2, 2) == [1, 2]  # runs up to the end of the sequence
    assert propose_draft([1, 2, 1, 2], 0, 2, 2) == []


def test_a_match_across_token_boundaries_is_not_a_match():
    # as int32 bytes, [256, 0] contains 0x00 0x01 0x00 0x00 0x00 ...: the tail [1, 0] must not match there
    assert propose_draft([256, 0, 0, 7, 1, 0], 2, 2, 2) == []
    assert propose_draft([9, 1, 0, 7, 256, 0, 0, 1, 0], 2, 2, 2) == [7, 256]


# ---- the engine -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    on = LLMEngine(EngineConfig())
    off = LLMEngine(EngineConfig(num_speculative_tokens=0))
    if not on.num_speculative_tokens:
        pytest.skip("the fused C++ step cannot build here: speculation needs it")  # no compiler: a missing dependency
    return on, off


def _chat(engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)


def _bfcl(n: int) -> list[tuple[list[dict], dict]]:
    """BFCL simple prompts (with the tool in the system message) and their tools' JSON Schemas."""
    return [(messages, schema) for _, messages, schema in bfcl_cases_with_ids(n)]


def test_greedy_output_is_token_identical_with_and_without_speculation(engines):
    on, off = engines
    texts = ["Repeat exactly, twice: the quick brown fox jumps over the lazy dog by the river bank.",
             "Copy this list back: alpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa.",
             "What is the capital of France?"]
    before = on.stats().draft_tokens_accepted
    for text in texts:
        prompt = _chat(on, text)
        for max_tokens in (64, 7):  # 7: drafts are cut so the output never passes max_tokens
            params = SamplingParams(max_tokens=max_tokens)
            a, b = on.generate(prompt, params)[0], off.generate(prompt, params)[0]
            assert a.output_token_ids == b.output_token_ids, (text, a.text, b.text)
            assert a.finish_reason == b.finish_reason and len(a.output_token_ids) <= max_tokens
    stats = on.stats()
    assert stats.draft_tokens_accepted > before  # the copying prompts did speculate (else this tests nothing)
    assert off.stats().draft_verify_steps == 0
    assert stats.kv_blocks_used == 0 and not on.has_unfinished_requests()


def test_grammar_constrained_output_is_identical_and_valid(engines):
    on, off = engines
    with tempfile.TemporaryDirectory() as cache:
        compiler = GrammarCompiler.from_tokenizer(on.tokenizer, vocab_size=on.vocab_size, cache_dir=cache)
        cases = [(messages, schema, compiler.compile_json_schema(schema)) for messages, schema in _bfcl(30)]
    before = on.stats().draft_tokens_accepted
    params = SamplingParams(max_tokens=96)
    for messages, schema, grammar in cases:
        prompt = on.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        a = on.generate(prompt, params, [GrammarMatcher(grammar, 96)])[0]
        b = off.generate(prompt, params, [GrammarMatcher(grammar, 96)])[0]
        assert a.output_token_ids == b.output_token_ids, (a.text, b.text)
        if a.finish_reason == "stop":
            jsonschema.validate(json.loads(a.text), schema)
    assert on.stats().draft_tokens_accepted > before
    # a batch of them at once (drafts of several sequences in one step) gives the same outputs
    wide = LLMEngine(EngineConfig(speculation_max_batch=len(cases)))
    prompts = [on.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _, _ in cases]
    batch = wide.generate(prompts, params, [GrammarMatcher(g, 96) for _, _, g in cases])
    assert wide.stats().draft_verify_steps > 0
    alone = [off.generate(p, params, [GrammarMatcher(g, 96)])[0] for p, (_, _, g) in zip(prompts, cases)]
    assert [o.output_token_ids for o in batch] == [o.output_token_ids for o in alone]


def test_a_draft_stops_before_the_first_token_the_grammar_refuses(engines):
    on, _ = engines
    with tempfile.TemporaryDirectory() as cache:
        compiler = GrammarCompiler.from_tokenizer(on.tokenizer, vocab_size=on.vocab_size, cache_dir=cache)
        grammar = compiler.compile_json_schema({"type": "object", "properties": {"n": {"type": "integer"}},
                                                "required": ["n"], "additionalProperties": False})
    tok = on.tokenizer
    matcher = GrammarMatcher(grammar)
    head = tok.encode('{"n":1', add_special_tokens=False)
    for t in head:
        matcher.accept_token(t)
    state = matcher.state
    good, bad = tok.encode("2}", add_special_tokens=False), tok.encode("x", add_special_tokens=False)
    assert matcher.count_allowed(good) == len(good)
    assert matcher.count_allowed(good[:1] + bad + good[1:]) == 1
    assert matcher.count_allowed([tok.eos_token_id]) == 0  # EOS is never drafted
    assert matcher.state == state  # read-only
    # the transcript had `x` after the same tokens earlier: that draft is refused, none is run
    prefix = head + bad + tok.encode(" b ", add_special_tokens=False) + head
    seq = Sequence("r", prefix, num_prompt_tokens=len(prefix) - 1, params=SamplingParams(max_tokens=16),
                   constraint=matcher)
    assert propose_draft(prefix, 4, 2, 3)[:len(bad)] == bad
    assert draft_for(seq, 4, 2, 3, 10_000) == []
    # an older occurrence followed by what the grammar allows is taken instead
    prefix = head + good + head + bad + head
    seq = Sequence("r", prefix, num_prompt_tokens=len(prefix) - 1, params=SamplingParams(max_tokens=16),
                   constraint=matcher)
    assert draft_for(seq, 4, 2, 3, 10_000) == good


def test_kept_draft_kv_serves_the_next_prompt_from_the_prefix_cache(engines):
    on, off = engines
    prompt = _chat(on, "Repeat exactly: one two three four five six seven eight nine ten eleven twelve.")
    first = on.generate(prompt, SamplingParams(max_tokens=40))[0]
    assert first.metrics.draft_tokens_accepted > 0
    # an agent's next step: the whole first exchange plus more; its cached part includes speculated tokens
    follow = first.prompt_token_ids + first.output_token_ids + on.tokenizer.encode(" And again:")
    a = on.generate(follow, SamplingParams(max_tokens=24))[0]
    b = off.generate(follow, SamplingParams(max_tokens=24))[0]
    assert a.metrics.cached_tokens > len(first.prompt_token_ids)
    assert a.output_token_ids == b.output_token_ids


def test_drafts_only_in_small_batches_and_shorter_after_misses(engines):
    on, _ = engines
    ids = [on.add_request(_chat(on, f"Repeat exactly: one two three four five six, {i}."), SamplingParams(max_tokens=32))
           for i in range(on.config.speculation_max_batch + 1)]
    seqs = [on._seqs[i] for i in ids]
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        on.step()
    on._propose_drafts()  # one request more than speculation_max_batch decodes: a draft row costs a full row
    assert all(not s.draft_token_ids for s in seqs)
    for i in ids[1:]:
        on.abort_request(i)
    on.step()
    seq = seqs[0]
    while not seq.finished and not seq.draft_token_ids:
        on.step()
        on._propose_drafts()
    assert seq.draft_token_ids  # alone, the copying request drafts
    seq.draft_limit = 1  # as after a draft that was missed from its first token
    on._propose_drafts()
    assert len(seq.draft_token_ids) == 1
    while not seq.finished:
        on.step()
        assert seq.draft_limit is None or 1 <= seq.draft_limit <= on.num_speculative_tokens
    on.step()
    assert not on.has_unfinished_requests() and on.stats().kv_blocks_used == 0


def test_sampling_with_temperature_never_speculates(engines):
    on, _ = engines
    before = on.stats().draft_verify_steps
    prompt = _chat(on, "Repeat exactly: red green blue red green blue red green blue.")
    outs = [on.generate(prompt, SamplingParams(max_tokens=24, temperature=0.8, seed=7))[0] for _ in range(2)]
    assert outs[0].output_token_ids == outs[1].output_token_ids  # seeded: reproducible
    assert on.stats().draft_verify_steps == before


def test_speculation_runs_only_on_the_fused_step():
    engine = LLMEngine(EngineConfig(quantization=None))  # the torch path: its chunks are not row-exact
    assert engine.num_speculative_tokens == 0 and "speculation" not in engine.describe()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="speculation_max_batch"):
        EngineConfig(speculation_max_batch=0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(prompt_lookup_min=3, prompt_lookup_max=2)
