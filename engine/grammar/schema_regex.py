"""JSON Schema (draft 2020-12 subset) -> a regex over compact JSON text.

Exactness first: every keyword that asserts something is either enforced exactly by the
regex or reported as unsupported (all of them at once, with JSON pointers). The regex may be
*narrower* than the schema in documented ways (it only ever loses valid outputs, never admits
invalid ones):

- compact JSON only: no whitespace between tokens; strings in one canonical encoding
  (see regex_util); numbers with bounds are written without exponent;
- declared properties appear in schema order; other keys come after them, valued by
  additionalProperties (true or omitted, as JSON Schema reads it: scalar values), not beside
  maxProperties, patternProperties or a presence plan that closes the object. A schema that
  wants only its named keys says ``additionalProperties: false`` (the planner closes tool
  arguments so: `agentrt.schema.close_objects`);
- unconstrained values (``{}``, ``true``, arrays without ``items``) nest at most
  ``max_any_depth`` (default 2) containers deep: a regular language cannot nest without
  bound, and each level adds the states of every value kind again after every place a free
  value stands; recursive ``$ref`` unrolls ``max_ref_depth`` levels;
- keys an object may have beyond its declared properties (additionalProperties,
  patternProperties) are generated only in the simple cases; property-presence combinators
  (see object_presence) offer only the value cells they can express.

outlines-core's own ``build_regex_from_schema`` is not used for this because it silently
ignores or mis-handles keywords (``allOf`` concatenates, ``oneOf`` = ``anyOf``, ``pattern``
is dropped next to ``minLength``, recursion is cut by dropping properties), and exactness
must be checkable; its regex -> ``Index`` builds the byte DFA (byte_dfa.py). What a regex cannot say
(several constraints on one string) is left to automata: a placeholder stands in the regex, and the
compile splices in the intersection's DFA (`schema_to_parts`, compile_job.py).
"""
from __future__ import annotations

import sys
import time
from typing import Any

from . import quick
from .errors import AutomatonTooLargeError, GrammarCompileError, UnsatisfiableSchemaError, UnsupportedSchemaError
from .one_of import UNCOMPILED, branches_disjoint
from .regex_util import alt
from .schema_arrays import array_regex
from .schema_context import ASSERTIONS, NOT_PLANNED, REFUSED, TYPES, UNRESOLVED, Ctx, any_value, has_ref, trivial
from .schema_not import not_by_type
from .schema_numbers import boolean_regex, integer_regex, null_regex, number_regex
from .schema_objects import object_regex, presence_regex
from .schema_refs import deref, lower_if, merge, merge_all_of, resolve, unevaluated, with_ref_depth
from .schema_strings import enum_regex, string_regex

def schema_to_regex(schema: Any, *, lenient: bool = False, max_ref_depth: int = 3,
                    max_any_depth: int = 2, timeout_s: float | None = None,
                    max_regex_chars: int = 4_000_000) -> tuple[str, list[str]]:
    """Compile ``schema`` to a regex over compact JSON text.

    Returns ``(regex, unenforced)``; ``unenforced`` is empty unless ``lenient`` (then it lists
    the keywords that were dropped and must be checked after generation). Raises
    UnsupportedSchemaError (strict mode) listing every keyword it cannot enforce, and
    GrammarCompileError for invalid schemas or schemas no JSON value satisfies. Parts a regex
    cannot say (a pattern beside length limits it cannot fold) are refused here; see
    `schema_to_parts` for the compile that builds them as automata.
    """
    regex, unenforced, _ = schema_to_parts(schema, lenient=lenient, max_ref_depth=max_ref_depth,
                                           max_any_depth=max_any_depth, timeout_s=timeout_s,
                                           max_regex_chars=max_regex_chars, holes=False)
    return regex, unenforced


def schema_to_parts(schema: Any, *, lenient: bool = False, max_ref_depth: int = 3, max_any_depth: int = 2,
                    timeout_s: float | None = None, max_regex_chars: int = 4_000_000,
                    holes: bool = True, split_objects: bool = False,
                    open_objects: bool = True) -> tuple[str, list[str], dict[int, list]]:
    """As `schema_to_regex`, plus the parts the regex leaves to automata: ``(regex, unenforced, holes)``,
    where ``holes`` maps each placeholder byte in the regex to what stands there: the regexes whose
    intersection it is (see dfa_ops and compile_job). With ``split_objects``, object-valued properties
    and array items are parts too (one regex each; it may hold the placeholders of parts made before it).
    With ``open_objects=False``, keys an object does not name are generated only where the schema gives
    additionalProperties (see `Ctx.open_objects`)."""
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
    ctx = Ctx(schema, lenient, max_ref_depth, max_any_depth, _node, _BUILDERS, deadline, max_regex_chars)
    ctx.open_objects = open_objects
    if holes:
        ctx.holes = {}
        ctx.split_objects = split_objects
    try:
        regex = ctx.node(schema, "")
    except RecursionError:
        raise GrammarCompileError(f"the schema's references unroll deeper than Python's recursion limit "
                                  f"({sys.getrecursionlimit()} frames): allOf/$ref refer to themselves, or "
                                  f"nest too many levels after unrolling") from None
    if ctx.problems and not lenient:
        raise UnsupportedSchemaError(ctx.problems)
    if regex is None:
        raise UnsatisfiableSchemaError("no JSON value satisfies this schema (as far as the grammar can tell)")
    return regex, ctx.problems, ctx.holes or {}


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


def _node(schema: Any, ctx: Ctx, path: str) -> str | None:
    regex = _node_regex(schema, ctx, path)
    # checked at every level, not once at the end: nesting multiplies the size, so a 25-deep array
    # would build gigabytes of regex before a final check could refuse it
    attempt = quick.limits()
    if attempt is not None and regex is not None and len(regex) > attempt.max_regex_chars:
        raise quick.QuickLimitExceeded(f"the schema at {path or '/'} expands to a {len(regex):,}-character regex")
    if regex is not None and len(regex) > ctx.max_regex_chars:
        raise AutomatonTooLargeError(f"the schema at {path or '/'} expands to a {len(regex):,}-character regex (limit "
                                  f"{ctx.max_regex_chars:,}): simplify it (less nesting, fewer $refs / alternatives)")
    return regex


def _node_regex(schema: Any, ctx: Ctx, path: str) -> str | None:
    quick.check()
    if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        raise GrammarCompileError(f"compiling the schema took longer than the time limit and was stopped at "
                                  f"{path or '/'} (simplify it: fewer nested $refs / alternatives, or raise timeout_s)")
    if schema is True:
        return any_value(ctx.max_any_depth)
    if schema is False:
        return None
    if not isinstance(schema, dict):
        raise GrammarCompileError(f"subschema at {path or '/'} must be an object or boolean")
    if ("const" in schema or "enum" in schema) and not has_ref(schema):
        return enum_regex(schema, ctx, path)  # every other keyword is checked on each value (exact)
    schema = lower_if(schema)
    planned = presence_regex(schema, ctx, path)
    if planned is not NOT_PLANNED:
        return planned
    schema = merge_all_of(schema, ctx, path)
    if not isinstance(schema, dict) or (("const" in schema or "enum" in schema) and not has_ref(schema)):
        return ctx.node(schema, path)
    schema = unevaluated(schema)
    if "not" in schema:
        negated = not_by_type(schema, ctx, path)
        if negated is not NOT_PLANNED:
            return negated
    # Unknown keywords are ignored by validators (annotations), so they are ignored here too.
    for kw in REFUSED:
        if kw in schema and not trivial(kw, schema[kw]):
            ctx.refuse(path, kw)

    if "$ref" in schema:
        return _reference(schema, ctx, path)
    if "anyOf" in schema or "oneOf" in schema:
        return _alternatives(schema, ctx, path)
    if "const" in schema or "enum" in schema:
        return enum_regex(schema, ctx, path)
    types = schema.get("type", list(TYPES))
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or any(t not in TYPES for t in types):
        raise GrammarCompileError(f"type at {path or '/'} must be one of {TYPES} or a list of them, got {types!r}")
    if "number" in types and "integer" in types:
        types = [t for t in types if t != "integer"]
    return alt([ctx.build(t, schema, path) for t in types])


def _reference(schema: dict, ctx: Ctx, path: str) -> str | None:
    """A ``$ref`` (recursion unrolled ``max_ref_depth`` levels), merged with assertions beside it."""
    target = resolve(schema["$ref"], ctx, path)
    if target is UNRESOLVED:
        return None
    rest = {k: v for k, v in schema.items() if k != "$ref"}
    if any(k in ASSERTIONS for k in rest):
        # a $ref beside other assertions is an intersection: merge when it is simple
        merged = merge(dict(target) if isinstance(target, dict) else target, rest, ctx, path)
        return with_ref_depth(schema["$ref"], ctx, lambda: ctx.node(merged, path))
    return with_ref_depth(schema["$ref"], ctx, lambda: ctx.node(target, path + "/$ref"))


def _alternatives(schema: dict, ctx: Ctx, path: str) -> str | None:
    """anyOf / oneOf: the branches (each merged with the keywords beside them), alternated; a oneOf
    only where its branches are proved exclusive."""
    key = "anyOf" if "anyOf" in schema else "oneOf"
    if "anyOf" in schema and "oneOf" in schema:
        ctx.refuse(path, "oneOf", "beside anyOf")
    branches = schema[key]
    if not isinstance(branches, list) or not branches:
        raise GrammarCompileError(f"{key} at {path or '/'} must be a non-empty array")
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
    # the keywords beside the branches first: an object's properties in the order it declares them,
    # then those only a branch names
    merged = [merge(rest, deref(br, ctx), ctx, f"{path}/{key}/{i}") if any(k in ASSERTIONS for k in rest)
              else deref(br, ctx) for i, br in enumerate(branches)]
    parts: list[str | None] = []
    known: list[Any] = []  # each branch's regex, UNCOMPILED where it came with refusals
    for i, br in enumerate(merged):
        before = len(ctx.problems)
        parts.append(ctx.node(br, f"{path}/{key}/{i}"))
        known.append(parts[-1] if len(ctx.problems) == before else UNCOMPILED)
    # the exclusivity proofs run on the branches' regexes as generated
    if key == "oneOf" and not branches_disjoint(merged, ctx, known):
        ctx.refuse(path, "oneOf", "branches may overlap; only provably exclusive branches are enforced")
    return alt(parts)


_BUILDERS = {
    "null": null_regex, "boolean": boolean_regex, "integer": integer_regex, "number": number_regex,
    "string": string_regex, "array": array_regex, "object": object_regex,
}
