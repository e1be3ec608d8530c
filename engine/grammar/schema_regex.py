"""JSON Schema (draft 2020-12 subset) -> a regex over compact JSON text.

Exactness first: every keyword that asserts something is either enforced exactly by the
regex or reported as unsupported (all of them at once, with JSON pointers). The regex may be
*narrower* than the schema in documented ways (it only ever loses valid outputs, never admits
invalid ones):

- compact JSON only: no whitespace between tokens; strings in one canonical encoding
  (see regex_util); numbers with bounds are written without exponent;
- declared properties appear in schema order; other keys come after them, only where the
  schema gives additionalProperties (true: scalar values) and not beside maxProperties,
  patternProperties or a presence plan that closes the object: each open object costs DFA
  states, so a schema that says nothing gets none (as xgrammar's strict mode);
- unconstrained values (``{}``, ``true``, arrays without ``items``) nest at most
  ``max_any_depth`` (default 1) containers deep: the DFA of deeper "any JSON" grows
  too fast to build (depth 2 is ~30x depth 1, depth 3 ~50x more); recursive ``$ref`` unrolls ``max_ref_depth`` levels;
- keys an object may have beyond its declared properties (additionalProperties,
  patternProperties) are generated only in the simple cases; property-presence combinators
  (see object_presence) offer only the value cells they can express.

outlines-core's own ``build_regex_from_schema`` is not used for this because it silently
ignores or mis-handles keywords (``allOf`` concatenates, ``oneOf`` = ``anyOf``, ``pattern``
is dropped next to ``minLength``, recursion is cut by dropping properties), and exactness
must be checkable; its regex -> token index (``Index``) is used for the token automaton.
"""
from __future__ import annotations

import json
import sys
import time
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from .errors import GrammarCompileError, UnsatisfiableSchemaError
from .object_keys import extras_tail, other_key
from .one_of import finite_disjoint, regexes_disjoint
from .object_presence import COMBINATORS, NotPresenceOnly, Plan, plan_object
from .regex_util import (
    BOOLEAN, FORMATS, INTEGER, NULL, NUMBER, STRING, STRING_CHAR, PatternError, alt,
    NON_INTEGER, int_range, json_literal_text, json_value_regex, length_bounds, lit, multiples_of, number_range,
    numbers_except, opt, pattern_regex, rep, seq, strings_except,
)

# Keywords that only annotate (or that 2020-12 validators ignore): never change validity.
ANNOTATIONS = {
    "$schema", "$id", "$comment", "$defs", "definitions", "$anchor", "$vocabulary", "title",
    "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "contentMediaType", "contentEncoding", "contentSchema",
}
# Keywords that assert something: each must be handled below or refused.
ASSERTIONS = {
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "contains", "prefixItems", "items",
    "unevaluatedItems", "additionalItems", "maxProperties", "minProperties", "required",
    "dependentRequired", "dependentSchemas", "dependencies", "properties", "patternProperties",
    "additionalProperties", "propertyNames", "unevaluatedProperties", "allOf", "anyOf", "oneOf",
    "not", "if", "then", "else", "$ref", "$dynamicRef", "$recursiveRef",
}
# The formats JSON Schema 2020-12 defines (and validators check); any other format is an annotation.
ASSERTED_FORMATS = {
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex", "color",
}
_TYPES = ("null", "boolean", "object", "array", "string", "number", "integer")


class _Ctx:
    def __init__(self, root: Any, lenient: bool, max_ref_depth: int, max_any_depth: int,
                 deadline: float | None = None, max_regex_chars: int = 4_000_000):
        self.deadline = deadline
        self.max_regex_chars = max_regex_chars
        self.root = root
        self.lenient = lenient
        self.max_ref_depth = max_ref_depth
        self.max_any_depth = max_any_depth
        self.problems: list[str] = []
        self.ref_depth: dict[str, int] = {}
        # draft 6 on: 1.0 is an integer; drafts 3/4 said no
        dialect = str(root.get("$schema", "")) if isinstance(root, dict) else ""
        self.float_ints = not any(d in dialect for d in ("draft-03", "draft-04"))

    def refuse(self, path: str, keyword: str, why: str = "") -> None:
        self.problems.append(f"{keyword} at {path or '/'}" + (f" ({why})" if why else ""))


def schema_to_regex(schema: Any, *, lenient: bool = False, max_ref_depth: int = 3,
                    max_any_depth: int = 1, timeout_s: float | None = None,
                    max_regex_chars: int = 4_000_000) -> tuple[str, list[str]]:
    """Compile ``schema`` to a regex over compact JSON text.

    Returns ``(regex, unenforced)``; ``unenforced`` is empty unless ``lenient`` (then it lists
    the keywords that were dropped and must be checked after generation). Raises
    UnsupportedSchemaError (strict mode) listing every keyword it cannot enforce, and
    GrammarCompileError for invalid schemas or schemas no JSON value satisfies.
    """
    from .errors import UnsupportedSchemaError

    if not isinstance(schema, (dict, bool)):
        raise GrammarCompileError(f"a JSON Schema must be an object or a boolean, got {type(schema).__name__}")
    depth = nesting_depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarCompileError(f"the schema nests {depth} levels of objects and arrays deep; the limit is "
                                  f"{MAX_SCHEMA_DEPTH}")
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    if isinstance(schema, dict) and any(d in str(schema.get("$schema", "")) for d in ("2019-09", "2020-12")):
        # draft 2019-09 replaced "dependencies" by dependentRequired/dependentSchemas: now an unknown keyword
        schema = _without_key(schema, "dependencies")
    ctx = _Ctx(schema, lenient, max_ref_depth, max_any_depth, deadline, max_regex_chars)
    try:
        regex = _node(schema, ctx, "")
    except RecursionError:
        raise GrammarCompileError(f"the schema's references unroll deeper than Python's recursion limit "
                                  f"({sys.getrecursionlimit()} frames): allOf/$ref refer to themselves, or "
                                  f"nest too many levels after unrolling") from None
    if ctx.problems and not lenient:
        raise UnsupportedSchemaError(ctx.problems)
    if regex is None:
        raise UnsatisfiableSchemaError("no JSON value satisfies this schema (as far as the grammar can tell)")
    return regex, ctx.problems


MAX_SCHEMA_DEPTH = 128  # JSON containers; the compile recurses a few frames per level of them


def nesting_depth(value: Any) -> int:
    """Levels of nested JSON objects and arrays in ``value`` (0 for a scalar), without recursion."""
    depth, level = 0, [value]
    while level:
        level = [c for v in level if isinstance(v, (dict, list)) for c in (v.values() if isinstance(v, dict) else v)]
        depth += 1
    return depth - 1


def _without_key(x: Any, key: str) -> Any:
    """``x`` with the keyword ``key`` removed from every subschema (property *names* are kept)."""
    if isinstance(x, list):
        return [_without_key(v, key) for v in x]
    if not isinstance(x, dict):
        return x
    return {k: (v if k in ("properties", "enum", "const") and not isinstance(v, dict) else
                {n: _without_key(s, key) for n, s in v.items()} if k in ("properties", "$defs", "definitions")
                else v if k in ("enum", "const") else _without_key(v, key))
            for k, v in x.items() if k != key}


# ----------------------------------------------------------------------------- any value
def any_value(depth: int) -> str:
    """Any compact JSON value, nested at most ``depth`` containers deep."""
    scalars = [NULL, BOOLEAN, NUMBER, STRING]
    if depth <= 0:
        return alt(scalars)  # type: ignore[return-value]
    inner = any_value(depth - 1)
    obj = r"\{" + opt(f"{STRING}:{inner}(?:,{STRING}:{inner})*") + r"\}"
    arr = r"\[" + opt(f"{inner}(?:,{inner})*") + r"\]"
    return alt(scalars + [obj, arr])  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the walker
def _node(schema: Any, ctx: _Ctx, path: str) -> str | None:
    regex = _node_regex(schema, ctx, path)
    # checked at every level, not once at the end: nesting multiplies the size, so a 25-deep array
    # would build gigabytes of regex before a final check could refuse it
    if regex is not None and len(regex) > ctx.max_regex_chars:
        raise GrammarCompileError(f"the schema at {path or '/'} expands to a {len(regex):,}-character regex (limit "
                                  f"{ctx.max_regex_chars:,}): simplify it (less nesting, fewer $refs / alternatives)")
    return regex


def _node_regex(schema: Any, ctx: _Ctx, path: str) -> str | None:
    if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        raise GrammarCompileError("compiling the schema took longer than the time limit and was stopped "
                                  "(simplify it: fewer nested $refs / alternatives, or raise timeout_s)")
    if schema is True:
        return any_value(ctx.max_any_depth)
    if schema is False:
        return None
    if not isinstance(schema, dict):
        raise GrammarCompileError(f"subschema at {path or '/'} must be an object or boolean")
    if ("const" in schema or "enum" in schema) and not _has_ref(schema):
        return _enum(schema, ctx, path)  # every other keyword is checked on each value (exact)
    schema = _lower_if(schema)
    planned = _presence(schema, ctx, path)
    if planned is not _NOT_PLANNED:
        return planned
    schema = _merge_all_of(schema, ctx, path)
    if not isinstance(schema, dict) or (("const" in schema or "enum" in schema) and not _has_ref(schema)):
        return _node(schema, ctx, path)
    schema = _unevaluated(schema)
    if "not" in schema:
        negated = _not_by_type(schema, ctx, path)
        if negated is not _NOT_PLANNED:
            return negated
    # Unknown keywords are ignored by validators (annotations), so they are ignored here too.
    for kw in _REFUSED:
        if kw in schema and not _trivial(kw, schema[kw]):
            ctx.refuse(path, kw)

    parts: list[str | None] = []
    if "$ref" in schema:
        target = _resolve(schema["$ref"], ctx, path)
        if target is _UNRESOLVED:
            return None
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        if any(k in ASSERTIONS for k in rest):
            # a $ref beside other assertions is an intersection: merge when it is simple
            merged = _merge(dict(target) if isinstance(target, dict) else target, rest, ctx, path)
            return _with_ref_depth(schema["$ref"], ctx, lambda: _node(merged, ctx, path))
        return _with_ref_depth(schema["$ref"], ctx, lambda: _node(target, ctx, path + "/$ref"))

    if "anyOf" in schema or "oneOf" in schema:
        key = "anyOf" if "anyOf" in schema else "oneOf"
        if "anyOf" in schema and "oneOf" in schema:
            ctx.refuse(path, "oneOf", "beside anyOf")
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise GrammarCompileError(f"{key} at {path or '/'} must be a non-empty array")
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        merged = [_merge(_deref(br, ctx), rest, ctx, f"{path}/{key}/{i}") if any(k in ASSERTIONS for k in rest)
                  else _deref(br, ctx) for i, br in enumerate(branches)]
        if key == "oneOf" and not _disjoint(merged, ctx):
            ctx.refuse(path, "oneOf", "branches may overlap; only provably exclusive branches are enforced")
        for i, br in enumerate(merged):
            parts.append(_node(br, ctx, f"{path}/{key}/{i}"))
        return alt(parts)

    if "const" in schema or "enum" in schema:
        return _enum(schema, ctx, path)

    types = schema.get("type", list(_TYPES))
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or any(t not in _TYPES for t in types):
        raise GrammarCompileError(f"type at {path or '/'} must be one of {_TYPES} or a list of them, got {types!r}")
    if "number" in types and "integer" in types:
        types = [t for t in types if t != "integer"]
    for t in types:
        parts.append(_BUILDERS[t](schema, ctx, path))
    return alt(parts)


_UNRESOLVED = object()
_NOT_PLANNED = object()
# refused wherever they assert something (unless a branch below enforces them)
_REFUSED = ("not", "if", "then", "else", "dependentSchemas", "dependencies", "dependentRequired",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems",
            "$dynamicRef", "$recursiveRef")


def _count_limits(schema: dict, path: str) -> tuple[int, int | None] | None:
    """(minProperties, maxProperties) when they say more than the declared/required properties do
    (then every property's presence is planned); None otherwise."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        return None
    required = [r for r in schema.get("required", []) if isinstance(r, str)] if isinstance(schema.get("required"), list) else []
    mn = _nonneg_int(schema, "minProperties", path, 0) or 0
    mx = _nonneg_int(schema, "maxProperties", path, None)
    n_all = len(set(props) | set(required))
    if mn > len(set(required)) or (mx is not None and mx < n_all):
        return mn, mx
    return None


def _unevaluated(schema: dict) -> dict:
    """Rewrite unevaluatedProperties / unevaluatedItems where no applicator sits beside them:
    unevaluatedProperties is then additionalProperties, and arrays get only prefixItems + items. Without ``items`` (and ``contains``), unevaluatedItems types the tail."""
    if any(k in schema for k in ("anyOf", "oneOf", "$ref", "allOf")):
        return schema  # handled on each branch / the merged schema
    out = schema
    if "unevaluatedProperties" in out and not out.get("patternProperties"):
        # no applicator beside it: the unevaluated keys are those properties does not name, which
        # is what additionalProperties covers (when that is given, every key is evaluated)
        rest = {k: v for k, v in out.items() if k != "unevaluatedProperties"}
        rest.setdefault("additionalProperties", out["unevaluatedProperties"])
        out = rest
    if "unevaluatedItems" in out and "contains" not in out:
        rest = {k: v for k, v in out.items() if k != "unevaluatedItems"}
        if "items" not in rest:
            rest["items"] = out["unevaluatedItems"]
        out = rest
    return out


def _presence(schema: dict, ctx: _Ctx, path: str) -> Any:
    """An object schema whose combinators only constrain property presence / enum values:
    exact via object_presence (oneOf, not, dependencies...); _NOT_PLANNED when it does not apply."""
    keys = [k for k in COMBINATORS if k in schema]
    count = _count_limits(schema, path)
    if ((not keys and count is None) or (keys and set(keys) <= {"anyOf"})
            or "$ref" in schema or "const" in schema or "enum" in schema):
        return _NOT_PLANNED
    if set(keys) == {"oneOf"} and isinstance(schema["oneOf"], list):
        # exclusive branches (types, discriminators): plain alternation, each branch in its own order
        scratch = _Ctx(ctx.root, True, 0, 0)
        rest = {k: v for k, v in schema.items() if k != "oneOf"}
        merged = [_merge(_deref(b, ctx), rest, scratch, path) for b in schema["oneOf"]]
        if not scratch.problems and _disjoint(merged, ctx):
            return _NOT_PLANNED
    if set(keys) == {"allOf"}:
        scratch = _Ctx(ctx.root, True, 0, 0)
        merged = _merge_all_of(schema, scratch, path)
        if not scratch.problems and (not isinstance(merged, dict) or not any(k in merged for k in COMBINATORS)):
            return _NOT_PLANNED  # a plain merge is exact and smaller
    types = schema.get("type", list(_TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in _TYPES for t in types):
        return _NOT_PLANNED
    base = {k: v for k, v in schema.items() if k not in COMBINATORS}
    props = base.get("properties", {})
    if (not isinstance(props, dict) or base.get("patternProperties")
            or any(k in base and not _trivial(k, base[k]) for k in _REFUSED)):
        return _NOT_PLANNED

    def resolve(ref: Any) -> Any:
        target = _resolve(ref, _Ctx(ctx.root, True, 0, 0), path)
        if target is _UNRESOLVED:
            raise NotPresenceOnly(f"$ref {ref!r}")
        return target

    def merge(a: Any, b: Any) -> Any:
        scratch = _Ctx(ctx.root, True, 0, 0)
        out = _merge(a, _deref(b, ctx), scratch, path)
        return None if scratch.problems or out is False else out

    try:
        plan = plan_object(schema, declared=props, addl=base.get("additionalProperties", True),
                           base_types=types, resolve=resolve, merge=merge, count=count)
    except NotPresenceOnly:
        return _NOT_PLANNED
    parts = [_object(base, ctx, path, plan)] if "object" in types else []
    others = [t for t in plan.other_types if not (t == "integer" and "number" in plan.other_types)]
    parts += [_BUILDERS[t](base, ctx, path) for t in others]
    return alt(parts)


def _trivial(kw: str, value: Any) -> bool:
    """Keywords whose given value asserts nothing."""
    if kw in ("unevaluatedProperties", "unevaluatedItems", "additionalItems"):
        return value is True or value == {}
    if kw in ("dependentSchemas", "dependentRequired", "dependencies", "patternProperties"):
        return value == {}
    if kw == "propertyNames":
        return value is True or value == {}
    if kw == "minContains":
        return False
    return False


def _with_ref_depth(ref: str, ctx: _Ctx, fn):
    depth = ctx.ref_depth.get(ref, 0)
    if depth > ctx.max_ref_depth:
        return None  # recursion cut: deeper values are not generated (narrower, never wider)
    ctx.ref_depth[ref] = depth + 1
    try:
        return fn()
    finally:
        ctx.ref_depth[ref] = depth


def _resolve(ref: Any, ctx: _Ctx, path: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        ctx.refuse(path, "$ref", f"only local references ('#...') are supported, got {ref!r}")
        return _UNRESOLVED
    frag = ref[1:]
    if frag and not frag.startswith("/"):
        ctx.refuse(path, "$ref", f"anchor references are not supported: {ref!r}")
        return _UNRESOLVED
    node = ctx.root
    for raw in frag.split("/")[1:] if frag else []:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise GrammarCompileError(f"$ref {ref!r} at {path or '/'} does not resolve")
    return node


def _deref(schema: Any, ctx: _Ctx) -> Any:
    """Follow a bare {"$ref": ...} (for inspection only; recursion is handled in _node)."""
    seen = 0
    while isinstance(schema, dict) and set(schema) - ANNOTATIONS == {"$ref"} and seen < 8:
        target = _resolve(schema["$ref"], _Ctx(ctx.root, True, 0, 0), "")
        if target is _UNRESOLVED:
            return schema
        schema, seen = target, seen + 1
    return schema


# ----------------------------------------------------------------------------- not / complements
class _Inexpressible(Exception):
    """The values failing a subschema cannot be written as a regex here."""


_KINDS = ("null", "boolean", "number", "string", "object", "array")  # "integer" lives inside "number"


def _kind_regex(kind: str, depth: int) -> str:
    """Every value of one kind (containers nest ``depth`` deep, as any_value)."""
    if kind in ("object", "array"):
        inner = any_value(depth - 1) if depth > 0 else None
        if inner is None:
            return r"\{\}" if kind == "object" else r"\[\]"
        if kind == "object":
            return r"\{" + opt(f"{STRING}:{inner}(?:,{STRING}:{inner})*") + r"\}"
        return r"\[" + opt(f"{inner}(?:,{inner})*") + r"\]"
    return {"null": NULL, "boolean": BOOLEAN, "number": NUMBER, "string": STRING}[kind]


def _complement(n: Any, ctx: _Ctx, depth: int) -> dict[str, str | None]:
    """Per kind, a regex for the values of that kind that FAIL subschema ``n`` (None: no such
    value). Narrower, never wider: numbers without exponents. Handles boolean schemas and
    subschemas of ``type`` / ``enum`` / ``const`` of scalars; raises _Inexpressible otherwise."""
    n = _deref(n, ctx)
    if n is True or n == {}:
        return dict.fromkeys(_KINDS)
    if n is False:
        return {k: _kind_regex(k, depth) for k in _KINDS}
    if not isinstance(n, dict) or set(n) - ANNOTATIONS - {"type", "enum", "const"}:
        raise _Inexpressible
    types = n.get("type", list(_TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in _TYPES for t in types):
        raise _Inexpressible
    values = _values(n)
    if values is None:  # type only: the other kinds, and non-integers when only integers pass
        out = {k: (None if k in types else _kind_regex(k, depth)) for k in _KINDS}
        if "integer" in types and "number" not in types:
            out["number"] = NON_INTEGER
        return out
    import jsonschema

    check = jsonschema.Draft202012Validator({"type": types})
    passing = [v for v in values if check.is_valid(v)]  # fails n = fails the type or is no listed value
    if any(isinstance(v, (dict, list)) for v in passing):
        raise _Inexpressible
    try:
        nums = numbers_except([Decimal(repr(v)) if isinstance(v, float) else Decimal(v) for v in passing
                               if isinstance(v, (int, float)) and not isinstance(v, bool)])
    except (PatternError, InvalidOperation):
        raise _Inexpressible from None
    bools = [b for b in ("true", "false") if not any(v is (b == "true") for v in passing)]
    return {"null": None if None in passing else NULL, "boolean": alt(bools), "number": nums,
            "string": strings_except([v for v in passing if isinstance(v, str)]),
            "object": _kind_regex("object", depth), "array": _kind_regex("array", depth)}


_FLIPPED = {"minimum": "exclusiveMaximum", "exclusiveMinimum": "maximum",
            "maximum": "exclusiveMinimum", "exclusiveMaximum": "minimum"}


def _negated_schemas(n: Any) -> list | None:
    """Schemas whose union is exactly the values failing ``n``, when ``n`` is one numeric bound or
    one length limit (values of the other types pass such a keyword, so only numbers / strings fail)."""
    if not isinstance(n, dict):
        return None
    keys = set(n) - ANNOTATIONS
    if len(keys) != 1:
        return None
    (kw,) = keys
    v = n[kw]
    if kw in _FLIPPED and isinstance(v, (int, float)) and not isinstance(v, bool):
        return [{"type": "number", _FLIPPED[kw]: v}]
    if kw in ("minLength", "maxLength") and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        if kw == "minLength":
            return [{"type": "string", "maxLength": v - 1}] if v > 0 else []
        return [{"type": "string", "minLength": v + 1}]
    return None


def _not_by_type(schema: dict, ctx: _Ctx, path: str) -> Any:
    """``{..., "not": N}`` where N is a type/enum/const test: per kind, the values the rest of the
    schema admits that fail N. Exact when, for each kind the rest admits, N either rejects the
    whole kind or the rest puts no constraint on that kind. _NOT_PLANNED otherwise (refused)."""
    rest = {k: v for k, v in schema.items() if k != "not"}
    if any(k in rest for k in ("$ref", "anyOf", "oneOf", "allOf", *_REFUSED)):
        return _NOT_PLANNED  # the per-type builders below do not see these
    branches = _negated_schemas(_deref(schema["not"], ctx))
    if branches is not None:  # not N == anyOf(branches): each merged with the rest
        scratch = _Ctx(ctx.root, True, 0, 0)
        merged = [_merge(rest, b, scratch, path) for b in branches]
        if not scratch.problems:
            return alt([_node(m, ctx, path) for m in merged])
    try:
        comp = _complement(schema["not"], ctx, ctx.max_any_depth)
    except _Inexpressible:
        return _NOT_PLANNED
    types = rest.get("type", list(_TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in _TYPES for t in types):
        return _NOT_PLANNED
    parts: list[str | None] = []
    for t in dict.fromkeys("number" if t == "integer" and "number" in types else t for t in types):
        kind = "number" if t == "integer" else t
        full = _kind_regex(kind, ctx.max_any_depth)
        if comp[kind] is None or (t == "integer" and comp[kind] == NON_INTEGER):
            continue  # N holds on every value of this kind (of these integers)
        if comp[kind] == full:
            parts.append(_BUILDERS[t]({**rest, "type": t}, ctx, path))  # N fails on the whole kind
            continue
        if t == "integer" or any(k in ASSERTIONS for k in rest if k != "type"):
            return _NOT_PLANNED  # the rest's own constraints on this kind would need intersecting
        parts.append(comp[kind])
    return alt(parts)


# ----------------------------------------------------------------------------- allOf / merging
def _merge_all_of(schema: dict, ctx: _Ctx, path: str) -> dict:
    if "allOf" not in schema:
        return schema
    subs = schema["allOf"]
    if not isinstance(subs, list) or not subs:
        raise GrammarCompileError(f"allOf at {path or '/'} must be a non-empty array")
    merged: Any = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in subs:
        merged = _merge(merged, _deref(sub, ctx), ctx, path + "/allOf")
    return merged if isinstance(merged, dict) else merged


def _lower_if(schema: Any) -> Any:
    """if/then/else as allOf/anyOf/not: ``(if AND then) OR (not if AND else)`` beside the rest;
    ``then``/``else`` without ``if`` assert nothing. The parts are then enforced (or refused) as any
    other allOf / anyOf / not."""
    if not isinstance(schema, dict) or not any(k in schema for k in ("if", "then", "else")):
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("if", "then", "else")}
    if "if" not in schema:
        return rest
    cond, then, other = schema["if"], schema.get("then", True), schema.get("else", True)
    if cond is True or cond is False:
        return {"allOf": [rest, then if cond is True else other]}
    return {"allOf": [rest, {"anyOf": [{"allOf": [cond, then]}, {"allOf": [other, {"not": cond}]}]}]}


def _merge(a: Any, b: Any, ctx: _Ctx, path: str) -> Any:
    """Intersection of two schemas when it is expressible as one schema; refuses otherwise."""
    if a is False or b is False:
        return False
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    a, b = _lower_if(a), _lower_if(b)  # if/then/else stay with their own subschema's keywords
    a = _merge_all_of(a, ctx, path)
    b = _merge_all_of(b, ctx, path)
    for kw in ("unevaluatedProperties", "unevaluatedItems"):
        if any(isinstance(x, dict) and kw in x and not _trivial(kw, x[kw]) for x in (a, b)):
            # which properties/items count as evaluated depends on where each keyword sits
            ctx.refuse(path, kw, "combined with another subschema")
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = _closed_over(a, b), _closed_over(b, a)
        a, b = _positional_items(a, b, ctx, path)
    out = dict(a)
    va, vb = _values(a), _values(b)
    if va is not None and vb is not None:  # enum/const on both sides: the common values
        for k in ("enum", "const"):
            out.pop(k, None)
        out["enum"] = [v for v in va if any(_json_eq(v, w) for w in vb)]
    for k, v in b.items():
        if k in ("enum", "const") and va is not None:
            continue
        if k not in out or out[k] == v or k in ANNOTATIONS:
            out.setdefault(k, v)
        elif k == "required":
            out[k] = list(dict.fromkeys(list(out[k]) + list(v)))
        elif k == "properties":
            props = dict(out[k])
            for name, sub in v.items():
                props[name] = _merge(props[name], sub, ctx, path) if name in props else sub
            out[k] = props
        elif k == "type":
            ta = {out[k]} if isinstance(out[k], str) else set(out[k])
            tb = {v} if isinstance(v, str) else set(v)
            both = (ta & tb) | ({"integer"} if ("number" in ta and "integer" in tb) or ("integer" in ta and "number" in tb) else set())
            out[k] = sorted(both) if both else "__none__"
        elif k in ("minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum"):
            out[k] = max(out[k], v)
        elif k in ("maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum"):
            out[k] = min(out[k], v)
        elif k == "additionalProperties" and (out[k] is False or v is False):
            out[k] = False  # the other side may declare properties: refused below if it matters
            if set(a.get("properties", {})) != set(b.get("properties", {})):
                ctx.refuse(path, "allOf", "additionalProperties: false combined with other properties")
        elif k == "additionalProperties" and not (a.get("patternProperties") or b.get("patternProperties")):
            out[k] = _merge(out[k], v, ctx, path)  # a key neither side names meets both
        else:
            ctx.refuse(path, "allOf", f"cannot intersect two different '{k}'")
    if out.get("type") == "__none__":
        return False
    return out


def _closed_over(x: dict, y: dict) -> dict:
    """``x`` with the properties only ``y`` names added as ``x``'s additionalProperties: in the
    intersection such a key must meet both, and the merged schema keeps a single properties map.
    Not done beside patternProperties (a name one of them matches is not additional)."""
    addl = x.get("additionalProperties", True)
    props, other = x.get("properties", {}), y.get("properties", {})
    if (addl is True or addl == {} or x.get("patternProperties") or y.get("patternProperties")
            or not isinstance(props, dict) or not isinstance(other, dict)):
        return x
    extra = {n: addl for n in other if n not in props}
    return {**x, "properties": {**props, **extra}} if extra else x


def _positional_items(a: dict, b: dict, ctx: _Ctx, path: str) -> tuple[dict, dict]:
    """Intersect prefixItems/items position by position: ``items`` applies only after its own
    schema's prefixItems, so ``{"items": A}`` and ``{"prefixItems": [B]}`` meet as
    ``{"prefixItems": [A and B], "items": A}``. Returns (a with the merged keywords, b without them)."""
    if not any("prefixItems" in x for x in (a, b)) or not all("prefixItems" in x or "items" in x for x in (a, b)):
        return a, b
    if any(isinstance(x.get("items"), list) or "additionalItems" in x for x in (a, b)):
        ctx.refuse(path, "allOf", "draft-07 tuple items combined with prefixItems")
    pa, pb = a.get("prefixItems", []), b.get("prefixItems", [])
    ia, ib = a.get("items", True), b.get("items", True)
    if not isinstance(pa, list) or not isinstance(pb, list):
        raise GrammarCompileError(f"prefixItems at {path or '/'} must be an array")
    prefix = [_merge(pa[i] if i < len(pa) else ia, pb[i] if i < len(pb) else ib, ctx, path)
              for i in range(max(len(pa), len(pb)))]
    merged = {**a, "prefixItems": prefix, "items": _merge(ia, ib, ctx, path)}
    return merged, {k: v for k, v in b.items() if k not in ("prefixItems", "items")}


def _values(schema: dict) -> list | None:
    """The values an enum/const allows (None when neither is there)."""
    if "const" in schema and "enum" in schema:
        return [v for v in schema["enum"] if _json_eq(v, schema["const"])] if isinstance(schema["enum"], list) else None
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


# ----------------------------------------------------------------------------- oneOf
def _disjoint(branches: list, ctx: _Ctx) -> bool:
    """True when no JSON value can satisfy two branches (checked by simple sufficient rules)."""
    derefd = [_deref(b, ctx) for b in branches]
    sigs = [_signature(b, ctx) for b in derefd]
    for i in range(len(sigs)):
        for j in range(i + 1, len(sigs)):
            if sigs[i] is not None and sigs[j] is not None and _sig_disjoint(sigs[i], sigs[j]):
                continue
            if not _pair_disjoint(derefd[i], derefd[j], ctx):
                return False
    return True


_STRING_KEYS = {"type", "pattern", "format", "minLength", "maxLength", "enum", "const"}


def _pair_disjoint(a: Any, b: Any, ctx: _Ctx) -> bool:
    """The proofs of one_of.py: a finite branch none of whose values the other admits, or two
    string branches whose regexes share no text."""
    if finite_disjoint(a, b, ctx.root) or finite_disjoint(b, a, ctx.root):
        return True
    regexes = []
    for s in (a, b):
        if not (isinstance(s, dict) and s.get("type") in ("string", ["string"])
                and set(s) - ANNOTATIONS <= _STRING_KEYS):
            return False
        scratch = _Ctx(ctx.root, True, 0, 0)
        r = _node(s, scratch, "")
        if scratch.problems:
            return False
        if r is None:
            return True  # a branch without values overlaps nothing
        regexes.append(r)
    return regexes_disjoint(*regexes)


def _signature(schema: Any, ctx: _Ctx) -> dict | None:
    if not isinstance(schema, dict):
        return None
    sig: dict = {}
    if "const" in schema or "enum" in schema:
        vals = [schema["const"]] if "const" in schema else schema["enum"]
        sig["values"] = {json.dumps(v, sort_keys=True) for v in vals}
    t = schema.get("type")
    if t is not None:
        ts = {t} if isinstance(t, str) else set(t)
        if "integer" in ts:
            ts.add("number")
        sig["types"] = ts
    props = schema.get("properties", {})
    req = set(schema.get("required", [])) if isinstance(schema.get("required"), list) else set()
    consts = {}
    for name in req:
        p = _deref(props.get(name), ctx)
        if isinstance(p, dict) and ("const" in p or "enum" in p):
            consts[name] = {json.dumps(v, sort_keys=True) for v in ([p["const"]] if "const" in p else p["enum"])}
    sig["discriminators"] = consts
    sig["object_only"] = sig.get("types") == {"object"}
    return sig


def _sig_disjoint(a: dict, b: dict) -> bool:
    if "values" in a and "values" in b and not (a["values"] & b["values"]):
        return True
    if "types" in a and "types" in b and not (a["types"] & b["types"]):
        return True
    if a["object_only"] and b["object_only"]:
        for k in set(a["discriminators"]) & set(b["discriminators"]):
            if not (a["discriminators"][k] & b["discriminators"][k]):
                return True
    return False


# ----------------------------------------------------------------------------- enum / const
def _enum(schema: dict, ctx: _Ctx, path: str) -> str | None:
    import jsonschema

    values = [schema["const"]] if "const" in schema else schema["enum"]
    if "const" in schema and "enum" in schema:
        values = [v for v in schema["enum"] if _json_eq(v, schema["const"])]
    if not isinstance(values, list):
        raise GrammarCompileError(f"enum at {path or '/'} must be an array")
    rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
    validator = None
    if any(k in ASSERTIONS for k in rest):
        if _has_ref(rest):
            ctx.refuse(path, "enum", "beside a $ref")
            return None
        validator = jsonschema.Draft202012Validator(rest, format_checker=jsonschema.FormatChecker())
    # 1.0 equals 1, but drafts 3/4 do not call it an integer: no zero fractions there beside a type check
    zero_fraction = ctx.float_ints or "integer" not in json.dumps(rest)
    out = []
    for v in values:
        if validator is not None and not validator.is_valid(v):
            continue
        try:
            out.append(json_value_regex(v, zero_fraction))
        except ValueError:
            continue
    return alt(out)


def _json_eq(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _has_ref(x: Any) -> bool:
    if isinstance(x, dict):
        return "$ref" in x or any(_has_ref(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_ref(v) for v in x)
    return False


# ----------------------------------------------------------------------------- per type
def _null(schema: dict, ctx: _Ctx, path: str) -> str:
    return NULL


def _boolean(schema: dict, ctx: _Ctx, path: str) -> str:
    return BOOLEAN


def _dec(v: Any, path: str, kw: str) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GrammarCompileError(f"{kw} at {path or '/'} must be a number, got {v!r}")
    try:
        return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    except InvalidOperation as e:
        raise GrammarCompileError(f"{kw} at {path or '/'}: {e}") from None


def _bounds(schema: dict, path: str):
    lo, lo_incl, hi, hi_incl = None, True, None, True
    if "minimum" in schema:
        lo, lo_incl = _dec(schema["minimum"], path, "minimum"), True
    if "exclusiveMinimum" in schema:
        v = _dec(schema["exclusiveMinimum"], path, "exclusiveMinimum")
        if lo is None or v >= lo:
            lo, lo_incl = v, False
    if "maximum" in schema:
        hi, hi_incl = _dec(schema["maximum"], path, "maximum"), True
    if "exclusiveMaximum" in schema:
        v = _dec(schema["exclusiveMaximum"], path, "exclusiveMaximum")
        if hi is None or v <= hi:
            hi, hi_incl = v, False
    return lo, lo_incl, hi, hi_incl


def _int_multiple(schema: dict, path: str) -> int | None:
    """multipleOf as a positive integer k (1 = no constraint on integers), or None when it is not one."""
    m = schema.get("multipleOf")
    if m is None:
        return 1
    if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0:
        raise GrammarCompileError(f"multipleOf at {path or '/'} must be a number above 0, got {m!r}")
    return int(m) if float(m).is_integer() else None


def _integer(schema: dict, ctx: _Ctx, path: str) -> str | None:
    """Integers; also written with a zero fraction ("1.0" is an integer in JSON Schema)."""
    r = _integer_digits(schema, ctx, path)
    if r is None or not ctx.float_ints:
        return r
    return f"(?:{r})" + r"(?:\.0+)?"


def _integer_digits(schema: dict, ctx: _Ctx, path: str) -> str | None:
    import math

    k = _int_multiple(schema, path)
    lo, lo_incl, hi, hi_incl = _bounds(schema, path)
    ilo = None if lo is None else (math.ceil(lo) if lo_incl else math.floor(lo) + 1)
    ihi = None if hi is None else (math.floor(hi) if hi_incl else math.ceil(hi) - 1)
    if k is None:  # a fractional multipleOf: validators' float division decides (0.07 is no multiple of 0.01)
        ctx.refuse(path, "multipleOf", "not an integer")
        return None
    if k > 1:
        try:
            return multiples_of(k, ilo, ihi)
        except PatternError as e:
            ctx.refuse(path, "multipleOf", str(e))
            return None
    if lo is None and hi is None:
        return INTEGER
    return int_range(ilo, ihi)


def _number(schema: dict, ctx: _Ctx, path: str) -> str | None:
    k = _int_multiple(schema, path)
    if k is None or k > 1 or ("multipleOf" in schema and k == 1):
        # an integer multipleOf admits integers only (written as integers: narrower than 4.0)
        return _integer(schema, ctx, path)
    lo, lo_incl, hi, hi_incl = _bounds(schema, path)
    if lo is None and hi is None:
        return NUMBER
    try:
        return number_range(lo, lo_incl, hi, hi_incl)
    except PatternError as e:
        ctx.refuse(path, "minimum/maximum", str(e))
        return None


def _nonneg_int(schema: dict, kw: str, path: str, default: int | None) -> int | None:
    v = schema.get(kw, default)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GrammarCompileError(f"{kw} at {path or '/'} must be a non-negative integer, got {v!r}")
    return v


def _string(schema: dict, ctx: _Ctx, path: str) -> str | None:
    mn = _nonneg_int(schema, "minLength", path, 0) or 0
    mx = _nonneg_int(schema, "maxLength", path, None)
    has_len = mn > 0 or mx is not None
    fmt, pattern = schema.get("format"), schema.get("pattern")
    inner: str | None
    if fmt is not None and fmt not in FORMATS and fmt not in ASSERTED_FORMATS:
        fmt = None  # not a format JSON Schema defines (OpenAPI's "binary", "int32"...): validators ignore it
    if fmt is not None and fmt not in FORMATS:
        ctx.refuse(path, "format", f"format {fmt!r} is not enforced (supported: {', '.join(sorted(FORMATS))})")
        fmt = None
    if pattern is not None and not isinstance(pattern, str):
        raise GrammarCompileError(f"pattern at {path or '/'} must be a string")
    if fmt and has_len:
        lo, hi = length_bounds(FORMATS[fmt])
        if (mx is not None and lo > mx) or (hi is not None and hi < mn):
            return None
        if lo >= mn and (mx is None or (hi is not None and hi <= mx)):
            has_len = False  # the format implies the limits (date, uuid...)
    constraints = [c for c in ("format" if fmt else None, "pattern" if pattern is not None else None,
                               "minLength/maxLength" if has_len and pattern is None else None) if c]
    if len(constraints) > 1:
        ctx.refuse(path, "+".join(constraints), "these cannot be intersected in one regex")
        return None
    if fmt:
        inner = FORMATS[fmt]
    elif pattern is not None:
        try:
            inner = pattern_regex(pattern, mn, mx)
        except PatternError as e:
            ctx.refuse(path, "pattern+minLength/maxLength" if has_len else "pattern", str(e))
            return None
    else:
        inner = rep(STRING_CHAR, mn, mx)
    return seq('"', inner, '"')


def _array(schema: dict, ctx: _Ctx, path: str) -> str | None:
    mn = _nonneg_int(schema, "minItems", path, 0) or 0
    mx = _nonneg_int(schema, "maxItems", path, None)
    if schema.get("uniqueItems") is True and (mx is None or mx > 1):
        ctx.refuse(path, "uniqueItems")
    prefix = schema.get("prefixItems", [])
    items = schema.get("items", True)
    if isinstance(items, list):  # draft-07 tuple form: items = prefixItems, additionalItems = items
        if "prefixItems" in schema:
            ctx.refuse(path, "items", "array form beside prefixItems")
            return None
        prefix, items = items, schema.get("additionalItems", True)
    elems = [_node(p, ctx, f"{path}/prefixItems/{i}") for i, p in enumerate(prefix)]
    tail = None if items is False else _node(items, ctx, f"{path}/items")
    k = len(elems)
    if tail is None:
        mx = k if mx is None else min(mx, k)
    if mx is not None and mx < mn:
        return None
    if "contains" in schema:
        return _contains_array(schema, ctx, path, prefix, items, mn, mx)

    def after(i: int) -> str | None:
        """Items i.. given that i >= 1 items were written (each preceded by a comma)."""
        if mx is not None and i >= mx:
            return ""
        if i < k:
            more = seq(",", elems[i], after(i + 1))
            return more if i < mn else opt(more)
        return rep(seq(",", tail), max(mn - i, 0), None if mx is None else mx - i)

    first = elems[0] if k else tail
    body = seq(first, after(1)) if (mx is None or mx >= 1) else None
    return seq(r"\[", body if mn >= 1 else opt(body), r"\]")


_MAX_CONTAINS_POSITIONS = 24  # explicit item positions a contains array spells out (the regex grows with them)


def _contains_array(schema: dict, ctx: _Ctx, path: str, prefix: list, items: Any, mn: int, mx: int | None) -> str | None:
    """Arrays with ``contains`` (and minContains / maxContains): a walk over item positions that
    counts the items matching it. A matching item must satisfy its position's schema AND
    ``contains`` (merged; refused when the merge is not expressible); with maxContains the others
    must fail ``contains``, which is expressible for type / enum / const tests (see _complement)."""
    c_min = _nonneg_int(schema, "minContains", path, 1)
    c_max = _nonneg_int(schema, "maxContains", path, None)
    contains = _deref(schema["contains"], ctx)
    if c_max is not None and c_max < c_min:
        return None
    if c_min == 0 and c_max is None:
        return _array({k: v for k, v in schema.items() if k != "contains"}, ctx, path)
    scratch = _Ctx(ctx.root, True, 0, 0)
    pos = [*prefix, True if items is False else items]  # pos[-1]: every item after the prefix
    merged = [_merge(_deref(p, ctx), contains, scratch, path) for p in pos]
    if scratch.problems:
        ctx.refuse(path, "contains", "cannot intersect it with the item schemas")
        return None
    hits = [_node(m, ctx, f"{path}/contains") for m in merged]
    if c_max is None:
        misses = [_node(p, ctx, f"{path}/items") for p in pos]
    else:
        try:
            comp = _complement(contains, ctx, ctx.max_any_depth)
        except _Inexpressible:
            ctx.refuse(path, "maxContains", "the items failing 'contains' cannot be written as a regex")
            return None
        misses = []
        for p in pos:
            miss = _not_by_type({**(_deref(p, ctx) if isinstance(_deref(p, ctx), dict) else {}), "not": contains},
                                ctx, path) if _deref(p, ctx) is not True else alt(list(comp.values()))
            if miss is _NOT_PLANNED:
                ctx.refuse(path, "maxContains", "the items failing 'contains' cannot be written as a regex")
                return None
            misses.append(miss)
    if items is False:
        hits[-1] = misses[-1] = None
    k = len(prefix)
    loop_from = max(k, mn, 1)  # from here on, positions are alike: the rest of the walk is a loop
    if mx is not None and mx > _MAX_CONTAINS_POSITIONS or loop_from > _MAX_CONTAINS_POSITIONS:
        ctx.refuse(path, "contains", f"more than {_MAX_CONTAINS_POSITIONS} item positions to spell out")
        return None
    memo: dict = {}

    def walk(i: int, c: int) -> str | None:
        """The items from position i on, given i items written of which c matched (c capped at
        c_min when there is no maxContains)."""
        if (i, c) in memo:
            return memo[(i, c)]
        j = min(i, k)  # schema index of position i
        sep = "," if i else ""
        end = "" if i >= mn and c >= c_min else None
        c_next = c + 1 if c_max is not None else min(c + 1, c_min)
        hit_ok = c_max is None or c < c_max
        if mx is not None and i >= mx:
            out = end
        elif mx is None and i >= loop_from:  # a loop of misses, then a hit (or the end)
            nxt = seq(",", hits[j], walk(i + 1, c_next)) if hit_ok and c_next != c else None
            if c_max is None and c >= c_min:
                nxt = None
            more = [p for p in (nxt,) if p is not None]
            tail = opt(alt(more)) if end == "" else alt(more)
            out = seq(rep(seq(",", misses[j]), 0, None), tail) if tail is not None else None
        else:
            steps = [end, seq(sep, misses[j], walk(i + 1, c)), seq(sep, hits[j], walk(i + 1, c_next)) if hit_ok else None]
            nonempty = [p for p in steps if p not in (None, "")]
            out = alt(nonempty)
            if end == "":
                out = opt(out) if out is not None else ""
        memo[(i, c)] = out
        return out

    return seq(r"\[", walk(0, 0), r"\]")


def _object(schema: dict, ctx: _Ctx, path: str, plan: Plan | None = None) -> str | None:
    """Objects: declared properties in schema order; ``plan`` (see object_presence) restricts
    which of the properties it mentions are present and with which value cells."""
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise GrammarCompileError(f"properties at {path or '/'} must be an object")
    required = schema.get("required", [])
    if not isinstance(required, list):
        required = []
    addl = schema.get("additionalProperties", True)
    mn = _nonneg_int(schema, "minProperties", path, 0) or 0
    mx = _nonneg_int(schema, "maxProperties", path, None)

    # free values in an object the schema asks for (type: object) nest max_any_depth deep; in one
    # that is only allowed (no type: any value) one less, as the object itself counts (DFA size)
    free_depth = ctx.max_any_depth if "type" in schema else ctx.max_any_depth - 1
    pprops = schema.get("patternProperties") or {}
    if not isinstance(pprops, dict):
        raise GrammarCompileError(f"patternProperties at {path or '/'} must be an object")

    if plan is not None and not plan.worlds:
        return None  # the combinators hold on no object
    if not props and not required and (plan is None or not plan.props):
        # a map: any keys, values by additionalProperties
        if mn > 1:
            ctx.refuse(path, "minProperties", "above 1 on an object without declared properties")
        if pprops:
            pair = _pattern_pairs(pprops, ctx, path)
        else:
            value = _node(addl, ctx, f"{path}/additionalProperties") if addl is not True else any_value(free_depth)
            pair = seq(STRING, ":", value)
        if pair is None:
            return seq(r"\{", r"\}") if mn == 0 else None
        hi = None if mx is None else mx
        if hi == 0:
            return r"\{\}"
        body = seq(pair, rep(seq(",", pair), 0, None if hi is None else hi - 1))
        return seq(r"\{", body if mn >= 1 else opt(body), r"\}")

    relevant = set(plan.props) if plan else set()
    # (key regex, value regexes (cells of a planned property), required, planned)
    entries: list[tuple[str, list[str | None], bool, bool]] = []

    def addl_value(name: str) -> str | None:
        matching = _matching_patterns(pprops, name, ctx, path)
        if matching:  # additionalProperties does not apply to names a patternProperties matches
            return _node(_merge_many(matching, ctx, path), ctx, f"{path}/patternProperties")
        if addl is False:
            return None
        return _node(addl, ctx, f"{path}/additionalProperties") if addl is not True else any_value(free_depth)

    if pprops:  # declared properties whose names a pattern matches must satisfy its schema too
        props = {name: _merge_many([sub, *_matching_patterns(pprops, name, ctx, path)], ctx, path)
                 for name, sub in props.items()}

    def planned(name: str) -> tuple[str, list[str | None], bool, bool]:
        cells = [_node(c.schema, ctx, f"{path}/properties/{name}") for c in plan.cells[name]]  # type: ignore[union-attr]
        return lit(json_literal_text(name)), cells, False, True

    for name, sub in props.items():
        if name in relevant:
            entries.append(planned(name))
        else:
            entries.append((lit(json_literal_text(name)), [_node(sub, ctx, f"{path}/properties/{name}")],
                            name in required, False))
    for name in required:
        if name not in props and name not in relevant:  # required but undeclared: typed by additionalProperties
            entries.append((lit(json_literal_text(name)), [addl_value(name)], True, False))
    for name in plan.props if plan else []:
        if name not in props:
            entries.append(planned(name))
    n_req = sum(1 for e in entries if e[2]) + (min((sum(x is not None for x in w) for w in plan.worlds), default=0)
                                                if plan else 0)
    counted = plan is not None and _count_limits(schema, path) is not None
    if mn > n_req and not counted:
        ctx.refuse(path, "minProperties", "more than the required properties")
    if mx is not None and mx < len(entries) and not counted:
        ctx.refuse(path, "maxProperties", "fewer than the declared properties")
    worlds = frozenset(plan.worlds) if plan else frozenset({()})
    extra = None
    if "additionalProperties" in schema and addl is not False and not pprops and mx is None and not counted \
            and not (plan and plan.closed):  # only where the schema opens the object itself: each costs DFA states
        names = [*props, *(r for r in required if isinstance(r, str)), *(plan.props if plan else [])]
        extra = other_pair(names, addl, ctx, f"{path}/additionalProperties", 0)
    return seq(r"\{", _object_body(entries, worlds, extra), r"\}")


def other_pair(names: list[str], addl: Any, ctx: _Ctx, path: str, free_depth: int) -> str | None:
    """``"key":value`` for the keys an open object may have besides ``names`` (None when the
    value schema is not enforceable: those keys are then not generated, narrower)."""
    scratch = _Ctx(ctx.root, True, ctx.max_ref_depth, ctx.max_any_depth, ctx.deadline, ctx.max_regex_chars)
    scratch.ref_depth = dict(ctx.ref_depth)
    value = _node(addl, scratch, path) if addl is not True else any_value(free_depth)
    return None if value is None or scratch.problems else seq(other_key(names), ":", value)


def _matching_patterns(pprops: dict, name: str, ctx: _Ctx, path: str) -> list:
    import re

    out = []
    for pat, sub in pprops.items():
        try:
            if re.search(pat, name):
                out.append(sub)
        except re.error:
            ctx.refuse(path, "patternProperties", f"pattern {pat!r} does not parse")
    return out


def _merge_many(schemas: list, ctx: _Ctx, path: str) -> Any:
    out: Any = True
    for sub in schemas:
        out = _merge(out, _deref(sub, ctx), ctx, path)
    return out


def _pattern_pairs(pprops: dict, ctx: _Ctx, path: str) -> str | None:
    """``"key":value`` for keys some pattern matches (other keys are not generated: narrower).
    Exact when one pattern (or all patterns share one schema): a key two patterns match would
    need both schemas."""
    subs = list(pprops.values())
    if any(not _json_eq(sub, subs[0]) for sub in subs[1:]):
        ctx.refuse(path, "patternProperties", "several patterns with different schemas")
        return None
    try:
        keys = alt([pattern_regex(p) for p in pprops])
    except PatternError as e:
        ctx.refuse(path, "patternProperties", str(e))
        return None
    return seq('"', keys, '":', _node(subs[0], ctx, f"{path}/patternProperties"))


def _object_body(entries: list[tuple[str, list[str | None], bool, bool]], worlds: frozenset,
                 extra: str | None = None) -> str | None:
    """The properties of an object, in order, comma-separated; ``worlds``: the allowed tuples of
    choices (None = absent, i = value cell i) over the planned entries, in their order; ``extra``:
    the ``"key":value`` pair of the other keys the object may have (written after the named ones)."""
    memo: dict = {}

    def body(i: int, started: bool, ws: frozenset) -> str | None:
        if i == len(entries):
            return None if () not in ws else "" if extra is None else extras_tail(extra, started)
        k = (i, started, ws)
        if k in memo:
            return memo[k]
        key, values, req, is_planned = entries[i]
        head = ("," if started else "") + key + ":"
        parts: list[str | None] = []
        if is_planned:
            groups: dict = {}
            for w in ws:
                groups.setdefault(w[0], set()).add(w[1:])
            if started:
                # choices leading to the same remaining worlds share their tail (keeps the regex linear)
                by_rest: dict = {}
                for choice in sorted(groups, key=lambda c: -1 if c is None else c):
                    by_rest.setdefault(frozenset(groups[choice]), []).append(choice)
                for rest, choices in by_rest.items():
                    here = [("" if c is None else seq(head, values[c])) for c in choices]
                    nonempty_here = [h for h in here if h != ""]
                    mid = alt(nonempty_here) if len(nonempty_here) == len(here) else opt(alt(nonempty_here))
                    parts.append(seq(mid, body(i + 1, True, rest)))
            else:
                for choice in sorted(groups, key=lambda c: -1 if c is None else c):
                    rest = frozenset(groups[choice])
                    parts.append(body(i + 1, False, rest) if choice is None
                                 else seq(head, values[choice], body(i + 1, True, rest)))
        elif started:
            tail = body(i + 1, True, ws)
            parts.append(seq(head, values[0], tail) if req else seq(opt(seq(head, values[0])), tail))
        else:
            parts.append(seq(head, values[0], body(i + 1, True, ws)))
            if not req:
                parts.append(body(i + 1, False, ws))
        nonempty = [p for p in parts if p != ""]
        out = alt(nonempty) if len(nonempty) == len(parts) else opt(alt(nonempty))
        memo[k] = out
        return out

    return body(0, False, worlds)


_BUILDERS = {
    "null": _null, "boolean": _boolean, "integer": _integer, "number": _number,
    "string": _string, "array": _array, "object": _object,
}
