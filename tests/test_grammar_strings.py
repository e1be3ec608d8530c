"""Grammar exactness below the object level: enum/const by JSON equality (1 == 1.0, key order),
``contains`` / minContains / maxContains, ``not`` on scalars, if/then/else.

Each schema's automaton is checked against jsonschema on a pool of values (and arrays of them):
every value it accepts must be valid (exactness), and the listed ``must_accept`` values must be
accepted (so the test also fails when a construct is silently refused or made empty)."""
from __future__ import annotations

import itertools
import json

import jsonschema
import pytest

from agentrt.engine.grammar import ByteAutomaton, UnsupportedSchemaError, schema_to_regex
from agentrt.engine.grammar.regex_util import json_value_regex, numbers_except, strings_except
from tests.helpers.grammar import compact

SCALARS = [-20, -10, -5, -1, 0, 1, 2, 3, 4, 5, 6, 1.5, -0.5, "", "a", "ab", "abc", "then", "else", None, True, False]


def _automaton(schema: dict) -> ByteAutomaton:
    regex, _ = schema_to_regex(schema)
    return ByteAutomaton(regex, timeout_s=None)


def _texts(value: object) -> list[str]:
    """A value's compact text and, for numbers, the same number with a zero fraction."""
    out = [compact(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        out.append(compact(value) + ".0")
    return out


def _check(schema: dict, pool: list, must_accept: list) -> None:
    a = _automaton(schema)
    v = jsonschema.Draft202012Validator(schema)
    for x in pool:
        for text in _texts(x):
            if a.fullmatch(text):
                assert v.is_valid(json.loads(text)), f"accepted invalid {text} for {schema}"
    for x in must_accept:
        assert v.is_valid(x), f"test data: {x!r} is not valid for {schema}"
        assert a.fullmatch(compact(x)), f"rejected valid {compact(x)} for {schema}"


@pytest.mark.parametrize("schema,must_accept", [
    ({"not": {"type": "integer"}}, [1.5, "a", None, True, [], {}]),
    ({"not": {"type": ["integer", "boolean"]}}, [1.5, "a", None]),
    ({"type": "string", "not": {"enum": ["a", "ab"]}}, ["", "abc", "b"]),
    ({"not": {"const": 1}}, [2, 0, "1", True, None, 1.5]),
    ({"not": {"exclusiveMaximum": 0}}, [0, 1, 1.5]),
    ({"type": "integer", "maximum": 10, "not": {"minimum": 3}}, [2, -5]),
    ({"multipleOf": 2, "not": {"exclusiveMaximum": 0}}, [0, 2, 4]),
    ({"not": {"maxLength": 2}}, ["abc", "then"]),
    ({"if": {"exclusiveMaximum": 0}, "then": {"minimum": -10}, "else": {"multipleOf": 2}}, [-5, -1, 0, 2, "a"]),
    ({"allOf": [{"if": {"exclusiveMaximum": 0}}, {"then": {"minimum": -10}}, {"else": {"multipleOf": 2}}]}, [-20, 3]),
    ({"if": True, "then": {"const": "then"}, "else": {"const": "else"}}, ["then"]),
    ({"if": False, "then": {"const": "then"}, "else": {"const": "else"}}, ["else"]),
    ({"if": {"maxLength": 4}, "then": {"const": "then"}, "else": {"const": "else"}}, ["then"]),
    ({"if": {"const": 1}, "then": False}, [2, "a"]),
    ({"type": "integer", "if": {"minimum": 2}, "then": {"maximum": 3}, "else": {"minimum": -5}}, [2, 3, -5, 1]),
])
def test_scalar_not_and_if_then_else_exact(schema, must_accept):
    _check(schema, SCALARS, must_accept)


ITEMS = [1, 2, 6, "a", None]  # with the arrays of up to 3 of them: a pool small enough for a shared CPU


@pytest.mark.parametrize("schema,must_accept", [
    ({"contains": {"minimum": 5}}, [[6], [1, 6], [6, 1, "a"], "x"]),
    ({"contains": {"const": 1}, "maxContains": 1}, [[1], [2, 1, 3]]),
    ({"contains": {"const": 1}, "minContains": 2}, [[1, 1], [1, 2, 1]]),
    ({"contains": {"const": 1}, "minContains": 0, "maxContains": 1}, [[], [2], [1, 2]]),
    ({"contains": {"const": 1}, "minContains": 2, "maxContains": 3}, [[1, 1], [1, 2, 1, 1]]),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "contains": {"type": "string"}, "maxItems": 3},
     [[1, "a"], [1, 2, "a"]]),
    ({"contains": True}, [[1]]),
    # items does not look into allOf's prefixItems: it still applies from the first position
    ({"allOf": [{"prefixItems": [{"minimum": 3}]}], "items": {"minimum": 5}}, [[6, 6], []]),
    ({"allOf": [{"prefixItems": [{"type": "integer"}, {"type": "string"}]}], "prefixItems": [{"minimum": 2}]},
     [[6, "a"], [2], [6, "a", None]]),
    ({"type": "array", "items": {"type": ["integer", "string"]}, "contains": {"type": "string"}, "maxContains": 1},
     [["a"], [1, "a", 2]]),
])
def test_contains_exact(schema, must_accept):
    pool = [list(arr) for n in range(4) for arr in itertools.product(ITEMS, repeat=n)] + SCALARS[::4]
    _check(schema, pool, must_accept)


def test_contains_false_admits_no_array():
    a = _automaton({"contains": False})
    assert not a.fullmatch("[]") and not a.fullmatch("[1]") and a.fullmatch('"s"')


def test_contains_refused_when_items_fail_it_cannot_be_written():
    # maxContains needs the items that fail `contains`: a pattern's complement is not a regex here
    with pytest.raises(UnsupportedSchemaError, match="maxContains"):
        schema_to_regex({"contains": {"pattern": "^a"}, "maxContains": 1})


@pytest.mark.parametrize("value,same,different", [
    (1, ["1", "1.0", "1.00"], ["1.5", "10", "true", "-1"]),
    (-2.0, ["-2", "-2.0"], ["2", "-2.5"]),
    (1.5, ["1.5", "1.50"], ["1.05", "15"]),
    (1e300, ["1e+300"], ["1"]),
    ({"foo": "bar", "baz": [0]}, ['{"foo":"bar","baz":[0]}', '{"baz":[0.0],"foo":"bar"}'], ['{"foo":"bar"}']),
    ([0, "a"], ["[0,\"a\"]", "[0.0,\"a\"]"], ["[\"a\",0]", "[false,\"a\"]"]),
])
def test_json_value_regex_is_json_equality(value, same, different):
    a = ByteAutomaton(json_value_regex(value), timeout_s=None)
    for text in same:
        assert a.fullmatch(text), text
    for text in different:
        assert not a.fullmatch(text), text


def test_enum_numbers_by_value_except_integers_in_draft4():
    assert _automaton({"enum": [0, [1]]}).fullmatch("0.0") and _automaton({"enum": [[1]]}).fullmatch("[1.0]")
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "enum": [1]}
    assert not _automaton(draft4).fullmatch("1.0") and _automaton(draft4).fullmatch("1")


ENUM_POOL = [1, 1.0, 2.5, 0, True, False, None, "1", "a", [1], {"a": 1}, [], {}]


@pytest.mark.parametrize("type_", ["integer", "number", "string", "boolean", "null", "array", "object",
                                   ["string", "null"], ["integer", "boolean"]])
def test_enum_beside_a_type_keeps_the_values_of_that_type(type_):
    """The type beside an enum filters its values as jsonschema does (1.0 is an integer in 2020-12, true
    is not a number), without building a validator per enum."""
    schema = {"type": type_, "enum": ENUM_POOL}
    _check(schema, ENUM_POOL, [x for x in ENUM_POOL if jsonschema.Draft202012Validator(schema).is_valid(x)])


def test_strings_and_numbers_except():
    from decimal import Decimal

    a = ByteAutomaton(strings_except(["", "a", "ab", 'q"']), timeout_s=None)
    for s, ok in [("", False), ("a", False), ("ab", False), ('q"', False), ("abc", True), ("b", True), ("q", True)]:
        assert a.fullmatch(compact(s)) == ok, s
    n = ByteAutomaton(numbers_except([Decimal(1), Decimal(3)]), timeout_s=None)
    for s, ok in [("1", False), ("1.0", False), ("3", False), ("2", True), ("1.5", True), ("-1", True), ("4", True)]:
        assert n.fullmatch(s) == ok, s


@pytest.mark.parametrize("fmt, texts", [
    ("json-pointer", ["", "/", "/a", "/a/b", "/~0~1", "/a~1b/0", "/é/ü", "a", "/~", "/~2", "~0", "//", "/a b"]),
    ("relative-json-pointer", ["0", "1", "0#", "12/a", "0/", "3/~0", "#", "01", "-1", "1#/a", "a", "/a", "1~"]),
])
def test_pointer_formats_agree_with_the_validator(fmt, texts):
    schema = {"type": "string", "format": fmt}
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    if fmt not in validator.format_checker.checkers:
        pytest.skip(f"this jsonschema does not check {fmt!r} (its jsonpointer dependency is missing)")
    a = ByteAutomaton(schema_to_regex(schema)[0], timeout_s=None)
    verdicts = {t: (a.fullmatch(compact(t)), validator.is_valid(t)) for t in texts}
    assert all(ours == theirs for ours, theirs in verdicts.values()), verdicts
    assert sum(theirs for _, theirs in verdicts.values()) >= 5


def test_uri_template_format_takes_rfc_6570_templates_only():
    a = ByteAutomaton(schema_to_regex({"type": "string", "format": "uri-template"})[0], timeout_s=None)
    for text in ["", "file:///{path}", "http://example.com/{+path}/here{?q,lang}", "{var:30}", "{list*}",
                 "/users/{id}/x%20y", "{.dom}", "{;x,y}", "X{#keys*}", "{a.b}", "{%41b}", "mailto:{user}@x.org"]:
        assert a.fullmatch(compact(text)), text
    for text in ["a{", "{}", "x}", "{a b}", "{a..b}", "{a:0}", "{a:12345}", "{+}", "50%", "a b", '{"}', "{a}}"]:
        assert not a.fullmatch(compact(text)), text


def test_uri_format_takes_any_scheme_rfc_3986_allows():
    a = ByteAutomaton(schema_to_regex({"type": "string", "format": "uri"})[0], timeout_s=None)
    for text in ["https://example.com/a/b?x=1&y=%20#frag", "file://path/to/root1", "file:///etc/hosts", "a:",
                 "mailto:someone@example.com", "urn:isbn:0451450523", "http://user:pw@host.io:8080/p;q",
                 "git+ssh://git@github.com/o/r.git", "data:text/plain,hi", "http://192.168.0.1/", "x:/abs/path"]:
        assert a.fullmatch(compact(text)), text
    for text in ["", "no-scheme", "1http://x", "http://exa mple.com", "http://x/%zz", "://x", "/relative",
                 "http://x:123456/", "http://x/a b", 'http://x/"', "ht tp://x"]:
        assert not a.fullmatch(compact(text)), text
