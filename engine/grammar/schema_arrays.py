"""Arrays: ``prefixItems`` / ``items`` with length limits, and ``contains`` with min/maxContains
as a walk over item positions."""
from __future__ import annotations

from typing import Any

from .regex_util import alt, json_literal_text, opt, rep, seq
from .schema_context import NOT_PLANNED, Ctx, enum_values, has_ref, nonneg_int
from .schema_not import Inexpressible, failing_values, not_by_type
from .schema_refs import deref, merge

def array_regex(schema: dict, ctx: Ctx, path: str) -> str | None:
    mn = nonneg_int(schema, "minItems", path, 0) or 0
    mx = nonneg_int(schema, "maxItems", path, None)
    if schema.get("uniqueItems") is True and (mx is None or mx > 1):
        unique = _unique_items(schema, ctx, path, mn, mx)
        if unique is not NOT_PLANNED:
            return unique
    prefix = schema.get("prefixItems", [])
    items = schema.get("items", True)
    if isinstance(items, list):  # draft-07 tuple form: items = prefixItems, additionalItems = items
        if "prefixItems" in schema:
            ctx.refuse(path, "items", "array form beside prefixItems")
            return None
        prefix, items = items, schema.get("additionalItems", True)
    elems = [ctx.node(p, f"{path}/prefixItems/{i}") for i, p in enumerate(prefix)]
    tail = None if items is False else ctx.value(items, f"{path}/items")
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


_MAX_UNIQUE_VALUES = 12  # a unique-items automaton has up to 2^n states per position in the values' texts


def _unique_items(schema: dict, ctx: Ctx, path: str, mn: int, mx: int | None) -> Any:
    """uniqueItems over a finite set of strings, booleans and null (an enum, a const, type boolean or
    null): arrays of distinct values, built as an automaton of its own (dfa_ops.unique_items_dfa).
    Over any other items refused by name, and NOT_PLANNED: the arrays without it (lenient mode)."""
    values = _finite_items(schema, ctx)
    if values is not None and (mn > len(values) or (mx is not None and mn > mx)):
        return None  # not that many distinct values
    hole = None
    if values is not None and len(values) <= _MAX_UNIQUE_VALUES:
        hole = ctx.hole([("unique_items", tuple(json_literal_text(v) for v in values), mn, mx)])
    if hole is None:
        ctx.refuse(path, "uniqueItems", f"only over at most {_MAX_UNIQUE_VALUES} strings, booleans or null (an enum)"
                   if values is None or len(values) > _MAX_UNIQUE_VALUES else
                   "where its automaton cannot stand (an alternative beside it starts alike)")
        return NOT_PLANNED
    return hole


def _finite_items(schema: dict, ctx: Ctx) -> list | None:
    """The distinct values ``items`` allows when they are finitely many strings, booleans or null."""
    import jsonschema

    if "prefixItems" in schema or "contains" in schema or not isinstance(schema.get("items"), dict):
        return None
    items = deref(schema["items"], ctx)
    if not isinstance(items, dict) or has_ref(items):
        return None
    values = enum_values(items)
    if values is None:
        kinds = items.get("type")
        values = {"boolean": [True, False], "null": [None]}.get(kinds) if isinstance(kinds, str) else None
    if values is None:
        return None
    try:
        validator = jsonschema.Draft202012Validator(items, format_checker=jsonschema.FormatChecker())
        values = [v for v in values if validator.is_valid(v)]
    except jsonschema.exceptions.SchemaError:
        return None
    if not all(v is None or isinstance(v, (str, bool)) for v in values):
        return None  # numbers: 1 and 1.0 are one value with many texts
    return list({json_literal_text(v): v for v in values}.values())


_MAX_CONTAINS_POSITIONS = 24  # explicit item positions a contains array spells out (the regex grows with them)


def _contains_array(schema: dict, ctx: Ctx, path: str, prefix: list, items: Any, mn: int, mx: int | None) -> str | None:
    """Arrays with ``contains`` (and minContains / maxContains): a walk over item positions that
    counts the items matching it. A matching item must satisfy its position's schema AND
    ``contains`` (merged; refused when the merge is not expressible); with maxContains the others
    must fail ``contains``, which is expressible for type / enum / const tests (see failing_values)."""
    c_min = nonneg_int(schema, "minContains", path, 1)
    c_max = nonneg_int(schema, "maxContains", path, None)
    contains = deref(schema["contains"], ctx)
    if c_max is not None and c_max < c_min:
        return None
    if c_min == 0 and c_max is None:
        return array_regex({k: v for k, v in schema.items() if k != "contains"}, ctx, path)
    scratch = ctx.scratch()
    pos = [*prefix, True if items is False else items]  # pos[-1]: every item after the prefix
    merged = [merge(deref(p, ctx), contains, scratch, path) for p in pos]
    if scratch.problems:
        ctx.refuse(path, "contains", "cannot intersect it with the item schemas")
        return None
    hits = [ctx.node(m, f"{path}/contains") for m in merged]
    if c_max is None:
        misses = [ctx.node(p, f"{path}/items") for p in pos]
    else:
        try:
            comp = failing_values(contains, ctx, ctx.max_any_depth)
        except Inexpressible:
            ctx.refuse(path, "maxContains", "the items failing 'contains' cannot be written as a regex")
            return None
        misses = []
        for p in pos:
            miss = not_by_type({**(deref(p, ctx) if isinstance(deref(p, ctx), dict) else {}), "not": contains},
                                ctx, path) if deref(p, ctx) is not True else alt(list(comp.values()))
            if miss is NOT_PLANNED:
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
