"""Objects and combinators compile exactly: each case lists values jsonschema calls valid (the
grammar must accept them, keys in schema order) and invalid (it must reject them)."""
from __future__ import annotations

import itertools
import json

import jsonschema
import pytest

from agentrt.engine.grammar import ByteAutomaton, schema_to_regex
from agentrt.engine.grammar.object_keys import other_key
from tests.helpers.grammar import compact


def assert_exact(schema: dict, good: list, bad: list) -> None:
    """The labels agree with jsonschema (formats asserted, as the grammar does), and the grammar accepts ``good`` and rejects ``bad``."""
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    auto = ByteAutomaton(schema_to_regex(schema)[0])
    for v in good:
        assert validator.is_valid(v), f"test data: {v!r} is not valid"
        assert auto.fullmatch(compact(v)), f"rejected valid {compact(v)} for {schema}"
    for v in bad:
        assert not validator.is_valid(v), f"test data: {v!r} is valid"
        assert not auto.fullmatch(compact(v)), f"accepted invalid {compact(v)} for {schema}"


def test_other_key_is_every_string_but_the_names():
    names = ["a", "ab", "b\n", "é", "x:y", ""]
    auto = ByteAutomaton(other_key(names))
    alphabet = ["a", "b", "\n", "é", '"', "\\", ":", "y", "x"]
    tried = 0
    for n in range(4):
        for chars in itertools.product(alphabet, repeat=n):
            s = "".join(chars)
            assert auto.fullmatch(json.dumps(s, ensure_ascii=False)) == (s not in names), repr(s)
            tried += 1
    assert tried > 700
    assert not auto.fullmatch('"\\u0061"')  # "a" written as an escape: not the canonical encoding
    assert ByteAutomaton(other_key([])).fullmatch('""')


@pytest.mark.parametrize("schema,good,bad", [
    # opened by additionalProperties: true: other keys after the declared ones, scalar values
    # (a nested value is valid but not generated: narrower, each free container costs DFA states)
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": True},
     [{"a": 1}, {"a": 1, "b": "x"}, {"a": 1, "b": 2.5, "": None}], [{"b": 1}, {"a": "x", "b": 1}, {}]),
    # no additionalProperties: other keys are valid but not generated (narrower, as xgrammar's strict mode)
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, [{}, {"a": 1}], [{"a": "x"}]),
    # additionalProperties types the other keys (and a required key the properties do not name)
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["z"],
      "additionalProperties": {"type": "string"}},
     [{"z": "q"}, {"a": 1, "z": "q", "b": "x"}], [{"z": 1}, {"a": 1}, {"z": "q", "b": 2}]),
    # closed: nothing else
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     [{}, {"a": 2}], [{"b": 1}, {"a": 2, "b": 1}]),
    # maxProperties counts the other keys too: none are generated (narrower), none wrongly accepted
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "maxProperties": 1},
     [{}, {"a": 1}], [{"a": 1, "b": 2}]),
    # unevaluatedProperties with nothing beside it is additionalProperties
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": {"type": "boolean"}},
     [{"a": 1, "b": True}, {"b": False}], [{"b": 1}, {"a": 1, "b": "x"}]),
    ({"type": "object", "unevaluatedProperties": False}, [{}], [{"a": 1}]),
    # a presence plan whose branches close the object: the other keys would flip them
    ({"type": "object", "oneOf": [
        {"properties": {"key": {"type": "string"}}, "required": ["key"], "additionalProperties": False},
        {"properties": {"keys": {"type": "array"}}, "required": ["keys"], "additionalProperties": False}]},
     [{"key": "k"}, {"keys": []}], [{"key": "k", "keys": []}, {"key": "k", "x": 1}, {}]),
    # a presence plan over open branches: other keys are free
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "additionalProperties": True, "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
     [{"a": 1}, {"b": 2, "c": "x"}], [{"a": 1, "b": 2}, {"c": 1}]),
])
def test_open_and_closed_objects(schema, good, bad):
    assert_exact(schema, good, bad)


@pytest.mark.parametrize("schema,good,bad", [
    # a property only one side names is an additional property of the other side
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
                {"properties": {"b": {"type": "integer"}}}]},
     [{"a": 1}, {"c": "x"}], [{"a": 1, "b": 2}, {"a": 1, "b": "x"}, {"c": 1}]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
                {"properties": {"b": {"type": "integer"}}, "required": ["a"]}]},
     [{"a": 1}], [{"a": 1, "b": 2}, {"b": 2}, {"a": 1, "c": 1}]),
    ({"allOf": [{"type": "object", "additionalProperties": {"type": "integer"}},
                {"additionalProperties": {"minimum": 3}}]},
     [{}, {"a": 3}], [{"a": 1}, {"a": "x"}]),
])
def test_all_of_merges_additional_properties(schema, good, bad):
    assert_exact(schema, good, bad)


@pytest.mark.parametrize("schema,good,bad", [
    # a finite branch none of whose values the other admits (asked of the validator)
    ({"oneOf": [{"type": "null"}, {"enum": ["GET", "POST"]}]}, [None, "GET"], ["PUT", 1]),
    ({"$defs": {"n": {"type": "integer", "minimum": 5}},
      "oneOf": [{"enum": [1, 2, "x"]}, {"$ref": "#/$defs/n"}]}, [1, "x", 5, 7], [3, "y"]),
    # string branches whose regexes share no text
    ({"type": ["integer", "string"], "oneOf": [
        {"type": "integer"}, {"type": "string", "pattern": "^-?\\d+/\\d+$"},
        {"type": "string", "pattern": "^-?0x1\\.[0-9a-f]{13}p[+-]\\d+$"}]},
     [1, "-4/7", "0x1.6a09e667f3bcdp+0"], ["x", "0x1.6a09e667f3bcdp", 1.5]),
    ({"oneOf": [{"type": "string", "format": "date"}, {"type": "string", "maxLength": 3}]},
     ["2024-01-31", "abc", ""], ["abcd", 3]),
])
def test_one_of_proven_exclusive(schema, good, bad):
    assert_exact(schema, good, bad)


@pytest.mark.parametrize("schema", [
    {"oneOf": [{"enum": ["a", "b"]}, {"type": "string", "maxLength": 1}]},  # "c" passes one, "a" both
    {"oneOf": [{"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "b$"}]},  # "ab"
])
def test_one_of_overlapping_is_refused(schema):
    from agentrt.engine.grammar import UnsupportedSchemaError

    with pytest.raises(UnsupportedSchemaError, match="oneOf"):
        schema_to_regex(schema)


@pytest.mark.parametrize("schema,good,bad", [
    ({"type": "object", "if": {"required": ["x"]}, "then": {"required": ["y"]}},
     [{}, {"y": 1}, {"x": 1, "y": 2}], [{"x": 1}, {"x": 1, "z": 2}]),
    # inside a oneOf branch (planned as one formula)
    ({"oneOf": [{"if": {"required": ["x"]}, "then": {"not": {"required": ["error"]}}, "else": {"required": ["error"]}},
                {"type": "object", "dependentSchemas": {"x": {"not": {"required": ["error"]}}}}]},
     [{}], [{"error": 1}, {"x": 1}, {"x": 1, "error": 1}, None, 1]),
    ({"type": "object", "properties": {"x": {"type": "integer"}, "y": {}},
      "if": {"properties": {"x": {"const": 1}}, "required": ["x"]},
      "then": {"required": ["y"]}, "else": {"not": {"required": ["y"]}}},
     # {"x": 2} is valid but not generated: "an integer other than 1" is a cell without a regex (narrower)
     [{"x": 1, "y": 0}, {}], [{"x": 1}, {"x": 2, "y": 0}, {"y": 0}, {"x": "1"}]),
    # no type: "if" on a non-object holds vacuously, so "then" decides
    ({"if": {"required": ["x"]}, "then": {"type": "object", "required": ["y"]}},
     [{"x": 1, "y": 1}, {}], [None, 1, {"x": 1}]),
    ({"then": {"required": ["y"]}, "type": "object"}, [{}, {"x": 1}], []),  # no "if": then asserts nothing
])
def test_if_then_else_on_presence(schema, good, bad):
    assert_exact(schema, good, bad)


def test_keys_a_schema_says_nothing_of_are_generated_after_the_named_ones():
    """additionalProperties omitted: JSON Schema lets any other key through (the grammar: with a scalar
    value); closed where the schema says false."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "bee": {"type": "string"}}, "required": ["a"]}
    assert_exact(schema, [{"a": 1}, {"a": 1, "b": 2}, {"a": 1, "be": None, "c": 1.5}, {"a": 1, "bee": "", "c": "d"},
                          {"a": 1, "bee ": True}],
                 [{"a": "1"}, {"b": 2}, {"a": 1, "bee": 2}])
    assert_exact({**schema, "additionalProperties": False}, [{"a": 1, "bee": "x"}], [{"a": 1, "b": 2}])


def test_an_open_grammar_too_large_falls_back_to_the_named_keys():
    """Other keys after every item's named ones make 1,000 items' automaton ~5x the closed one's: past the
    open attempt's limits the compile generates the named keys only (narrower, never wider)."""
    from agentrt.engine.grammar.compile_job import schema_to_dfa

    def dfa(n: int):
        return schema_to_dfa({"type": "array", "maxItems": n,
                              "items": {"type": "object", "properties": {"a": {"type": "integer"}}}}, False, 30)[2]

    assert dfa(20).fullmatch(b'[{"a":1,"b":2}]')
    closed = dfa(1000)
    assert closed.fullmatch(b'[{"a":1},{}]') and not closed.fullmatch(b'[{"a":1,"b":2}]')
    assert closed.num_states < 15_000
