"""References and merging: ``$ref`` resolution, ``allOf`` / if-then-else lowered to one schema,
the intersection of two schemas where one schema can express it, ``unevaluated*`` rewritten."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from .errors import GrammarCompileError
from .schema_context import ANNOTATIONS, UNRESOLVED, Ctx, enum_values, json_eq, trivial

def with_ref_depth(ref: str, ctx: Ctx, fn):
    depth = ctx.ref_depth.get(ref, 0)
    if depth > ctx.max_ref_depth:
        return None  # recursion cut: deeper values are not generated (narrower, never wider)
    ctx.ref_depth[ref] = depth + 1
    try:
        return fn()
    finally:
        ctx.ref_depth[ref] = depth


def resolve(ref: Any, ctx: Ctx, path: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        ctx.refuse(path, "$ref", f"only local references ('#...') are supported, got {ref!r}")
        return UNRESOLVED
    frag = ref[1:]
    if frag and not frag.startswith("/"):
        found = anchor_target(ctx.root, unquote(frag))
        if isinstance(found, str):
            ctx.refuse(path, "$ref", f"{ref!r}: {found}")
            return UNRESOLVED
        return found[0]
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


# values that are data, not schemas: an "id" inside them names nothing
_DATA_KEYWORDS = ("enum", "const", "default", "examples")


def anchor_target(root: Any, name: str) -> tuple[Any] | str:
    """(the subschema a plain-name fragment ``#name`` refers to,), or why it cannot be told: the schema
    that declares the name as its ``$anchor`` (2019-09 on), or whose ``$id`` (drafts 6 and 7) or ``id``
    (draft 4) is ``#name``, by the dialect ``$schema`` names (any of them when it names none). Only in a
    document without embedded resources (an ``$id`` that is a URI below the root would start a new base)."""
    dialect = str(root.get("$schema", "")) if isinstance(root, dict) else ""
    forms = ([("$anchor", name)] if any(d in dialect for d in ("2019-09", "2020-12"))
             else [("$id", f"#{name}")] if any(d in dialect for d in ("draft-06", "draft-07"))
             else [("id", f"#{name}")] if any(d in dialect for d in ("draft-03", "draft-04"))
             else [("$anchor", name), ("$id", f"#{name}"), ("id", f"#{name}")])
    id_keys = {k if k != "$anchor" else "$id" for k, _ in forms}
    found: list[Any] = []
    nodes = [(root, True)]
    while nodes:
        node, is_root = nodes.pop()
        if isinstance(node, list):
            nodes += [(v, False) for v in node]
            continue
        if not isinstance(node, dict):
            continue
        for key in id_keys if not is_root else ():
            if isinstance(node.get(key), str) and not node[key].startswith("#"):
                return f"anchors in a document with embedded resources ({key} {node[key]!r}) are not supported"
        if any(node.get(k) == v for k, v in forms):
            found.append(node)
        nodes += [(v, False) for k, v in node.items() if k not in _DATA_KEYWORDS]
    if len(found) != 1:
        return f"{'no' if not found else 'more than one'} subschema declares the anchor {name!r}"
    return (found[0],)


def deref(schema: Any, ctx: Ctx) -> Any:
    """Follow a bare {"$ref": ...} (for inspection only; recursion is handled in _node)."""
    seen = 0
    while isinstance(schema, dict) and set(schema) - ANNOTATIONS == {"$ref"} and seen < 8:
        target = resolve(schema["$ref"], ctx.scratch(), "")
        if target is UNRESOLVED:
            return schema
        schema, seen = target, seen + 1
    return schema


def unevaluated(schema: dict) -> dict:
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


def merge_all_of(schema: dict, ctx: Ctx, path: str) -> dict:
    if "allOf" not in schema:
        return schema
    subs = schema["allOf"]
    if not isinstance(subs, list) or not subs:
        raise GrammarCompileError(f"allOf at {path or '/'} must be a non-empty array")
    merged: Any = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in subs:
        merged = merge(merged, deref(sub, ctx), ctx, path + "/allOf")
    return merged if isinstance(merged, dict) else merged


def lower_if(schema: Any) -> Any:
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


def merge(a: Any, b: Any, ctx: Ctx, path: str) -> Any:
    """Intersection of two schemas when it is expressible as one schema; refuses otherwise."""
    if a is False or b is False:
        return False
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    a, b = lower_if(a), lower_if(b)  # if/then/else stay with their own subschema's keywords
    a = merge_all_of(a, ctx, path)
    b = merge_all_of(b, ctx, path)
    for kw in ("unevaluatedProperties", "unevaluatedItems"):
        if any(isinstance(x, dict) and kw in x and not trivial(kw, x[kw]) for x in (a, b)):
            # which properties/items count as evaluated depends on where each keyword sits
            ctx.refuse(path, kw, "combined with another subschema")
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = _closed_over(a, b), _closed_over(b, a)
        a, b = _positional_items(a, b, ctx, path)
    out = dict(a)
    va, vb = enum_values(a), enum_values(b)
    if va is not None and vb is not None:  # enum/const on both sides: the common values
        for k in ("enum", "const"):
            out.pop(k, None)
        out["enum"] = [v for v in va if any(json_eq(v, w) for w in vb)]
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
                props[name] = merge(props[name], sub, ctx, path) if name in props else sub
            out[k] = props
        elif k == "type":
            ta = {out[k]} if isinstance(out[k], str) else set(out[k])
            tb = {v} if isinstance(v, str) else set(v)
            both = (ta & tb) | ({"integer"} if ("number" in ta and "integer" in tb) or ("integer" in ta and "number" in tb) else set())
            out[k] = sorted(both) if both else "__none__"
        elif k == "multipleOf" and _is_step(out[k]) and _is_step(v):
            out[k] = _common_multiple(out[k], v)  # a multiple of both is a multiple of their lcm
        elif k in ("minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum"):
            out[k] = max(out[k], v)
        elif k in ("maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum"):
            out[k] = min(out[k], v)
        elif k == "additionalProperties" and (out[k] is False or v is False):
            out[k] = False  # the other side may declare properties: refused below if it matters
            if set(a.get("properties", {})) != set(b.get("properties", {})):
                ctx.refuse(path, "allOf", "additionalProperties: false combined with other properties")
        elif k == "additionalProperties" and not (a.get("patternProperties") or b.get("patternProperties")):
            out[k] = merge(out[k], v, ctx, path)  # a key neither side names meets both
        else:
            ctx.refuse(path, "allOf", f"cannot intersect two different '{k}'")
    if out.get("type") == "__none__":
        return False
    return out


def _is_step(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x)


def _common_multiple(a: float, b: float) -> float:
    """The least common multiple of two steps, taken as the decimals they are written as (0.25 and 0.1
    give 0.5); an int when it is whole."""
    fa, fb = Fraction(repr(a)), Fraction(repr(b))
    lcm = Fraction(math.lcm(fa.numerator, fb.numerator), math.gcd(fa.denominator, fb.denominator))
    return int(lcm) if lcm.denominator == 1 else float(lcm)


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


def _positional_items(a: dict, b: dict, ctx: Ctx, path: str) -> tuple[dict, dict]:
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
    prefix = [merge(pa[i] if i < len(pa) else ia, pb[i] if i < len(pb) else ib, ctx, path)
              for i in range(max(len(pa), len(pb)))]
    merged = {**a, "prefixItems": prefix, "items": merge(ia, ib, ctx, path)}
    return merged, {k: v for k, v in b.items() if k not in ("prefixItems", "items")}


def merge_many(schemas: list, ctx: Ctx, path: str) -> Any:
    out: Any = True
    for sub in schemas:
        out = merge(out, deref(sub, ctx), ctx, path)
    return out
