"""Objects and combinators compile exactly: each case lists values jsonschema calls valid (the
grammar must accept them, keys in schema order) and invalid (it must reject them)."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _grammar_util import compact  # noqa: E402

from agentrt.engine.grammar import ByteAutomaton, schema_to_regex  # noqa: E402
from agentrt.engine.grammar.object_keys import other_key  # noqa: E402


def assert_exact(schema: dict, good: list, bad: list) -> None:
    """The labels agree with jsonschema, and the grammar accepts ``good`` and rejects ``bad``."""
    validator = jsonschema.Draft202012Validator(schema)
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
    # open object: other keys after the declared ones, any value (one level deep)
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
     [{"a": 1}, {"a": 1, "b": "x"}, {"a": 1, "b": {"c": 1}, "": None}], [{"b": 1}, {"a": "x", "b": 1}, {}]),
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
      "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
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
