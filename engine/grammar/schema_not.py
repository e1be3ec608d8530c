"""``not``: the values failing a subschema, per JSON kind, where a regex can say it (type / enum /
const tests, one numeric bound or length limit)."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from .regex_util import BOOLEAN, NON_INTEGER, NULL, NUMBER, STRING, PatternError, alt, numbers_except, opt, strings_except
from .schema_context import ANNOTATIONS, ASSERTIONS, NOT_PLANNED, REFUSED, TYPES, Ctx, any_value, enum_values
from .schema_refs import deref, merge

class Inexpressible(Exception):
    """The values failing a subschema cannot be written as a regex here."""


KINDS = ("null", "boolean", "number", "string", "object", "array")  # "integer" lives inside "number"


def kind_regex(kind: str, depth: int) -> str:
    """Every value of one kind (containers nest ``depth`` deep, as any_value)."""
    if kind in ("object", "array"):
        inner = any_value(depth - 1) if depth > 0 else None
        if inner is None:
            return r"\{\}" if kind == "object" else r"\[\]"
        if kind == "object":
            return r"\{" + opt(f"{STRING}:{inner}(?:,{STRING}:{inner})*") + r"\}"
        return r"\[" + opt(f"{inner}(?:,{inner})*") + r"\]"
    return {"null": NULL, "boolean": BOOLEAN, "number": NUMBER, "string": STRING}[kind]


def failing_values(n: Any, ctx: Ctx, depth: int) -> dict[str, str | None]:
    """Per kind, a regex for the values of that kind that FAIL subschema ``n`` (None: no such
    value). Narrower, never wider: numbers without exponents. Handles boolean schemas and
    subschemas of ``type`` / ``enum`` / ``const`` of scalars; raises Inexpressible otherwise."""
    n = deref(n, ctx)
    if n is True or n == {}:
        return dict.fromkeys(KINDS)
    if n is False:
        return {k: kind_regex(k, depth) for k in KINDS}
    if not isinstance(n, dict) or set(n) - ANNOTATIONS - {"type", "enum", "const"}:
        raise Inexpressible
    types = n.get("type", list(TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in TYPES for t in types):
        raise Inexpressible
    values = enum_values(n)
    if values is None:  # type only: the other kinds, and non-integers when only integers pass
        out = {k: (None if k in types else kind_regex(k, depth)) for k in KINDS}
        if "integer" in types and "number" not in types:
            out["number"] = NON_INTEGER
        return out
    import jsonschema

    check = jsonschema.Draft202012Validator({"type": types})
    passing = [v for v in values if check.is_valid(v)]  # fails n = fails the type or is no listed value
    if any(isinstance(v, (dict, list)) for v in passing):
        raise Inexpressible
    try:
        nums = numbers_except([Decimal(repr(v)) if isinstance(v, float) else Decimal(v) for v in passing
                               if isinstance(v, (int, float)) and not isinstance(v, bool)])
    except (PatternError, InvalidOperation):
        raise Inexpressible from None
    bools = [b for b in ("true", "false") if not any(v is (b == "true") for v in passing)]
    return {"null": None if None in passing else NULL, "boolean": alt(bools), "number": nums,
            "string": strings_except([v for v in passing if isinstance(v, str)]),
            "object": kind_regex("object", depth), "array": kind_regex("array", depth)}


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


def not_by_type(schema: dict, ctx: Ctx, path: str) -> Any:
    """``{..., "not": N}`` where N is a type/enum/const test: per kind, the values the rest of the
    schema admits that fail N. Exact when, for each kind the rest admits, N either rejects the
    whole kind or the rest puts no constraint on that kind. NOT_PLANNED otherwise (refused)."""
    rest = {k: v for k, v in schema.items() if k != "not"}
    if any(k in rest for k in ("$ref", "anyOf", "oneOf", "allOf", *REFUSED)):
        return NOT_PLANNED  # the per-type builders below do not see these
    branches = _negated_schemas(deref(schema["not"], ctx))
    if branches is not None:  # not N == anyOf(branches): each merged with the rest
        scratch = ctx.scratch()
        merged = [merge(rest, b, scratch, path) for b in branches]
        if not scratch.problems:
            return alt([ctx.node(m, path) for m in merged])
    try:
        comp = failing_values(schema["not"], ctx, ctx.max_any_depth)
    except Inexpressible:
        return NOT_PLANNED
    types = rest.get("type", list(TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in TYPES for t in types):
        return NOT_PLANNED
    parts: list[str | None] = []
    for t in dict.fromkeys("number" if t == "integer" and "number" in types else t for t in types):
        kind = "number" if t == "integer" else t
        full = kind_regex(kind, ctx.max_any_depth)
        if comp[kind] is None or (t == "integer" and comp[kind] == NON_INTEGER):
            continue  # N holds on every value of this kind (of these integers)
        if comp[kind] == full:
            parts.append(ctx.build(t, {**rest, "type": t}, path))  # N fails on the whole kind
            continue
        if t == "integer" or any(k in ASSERTIONS for k in rest if k != "type"):
            return NOT_PLANNED  # the rest's own constraints on this kind would need intersecting
        parts.append(comp[kind])
    return alt(parts)
