"""Objects: declared properties in schema order, required / additional / pattern properties, and
the presence combinators (oneOf, not, dependencies... over which properties appear) planned by
object_presence."""
from __future__ import annotations

from typing import Any

from .errors import GrammarCompileError
from .object_keys import extras_tail, other_key
from .object_presence import COMBINATORS, NotPresenceOnly, Plan, plan_object
from .one_of import branches_disjoint
from .regex_util import STRING, PatternError, alt, json_literal_text, lit, opt, pattern_regex, rep, seq
from .schema_context import NOT_PLANNED, REFUSED, TYPES, UNRESOLVED, Ctx, any_value, json_eq, nonneg_int, trivial
from .schema_refs import deref, merge, merge_all_of, merge_many, resolve

def count_limits(schema: dict, path: str) -> tuple[int, int | None] | None:
    """(minProperties, maxProperties) when they say more than the declared/required properties do
    (then every property's presence is planned); None otherwise."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        return None
    required = [r for r in schema.get("required", []) if isinstance(r, str)] if isinstance(schema.get("required"), list) else []
    mn = nonneg_int(schema, "minProperties", path, 0) or 0
    mx = nonneg_int(schema, "maxProperties", path, None)
    n_all = len(set(props) | set(required))
    if mn > len(set(required)) or (mx is not None and mx < n_all):
        return mn, mx
    return None


def presence_regex(schema: dict, ctx: Ctx, path: str) -> Any:
    """An object schema whose combinators only constrain property presence / enum values:
    exact via object_presence (oneOf, not, dependencies...); NOT_PLANNED when it does not apply."""
    keys = [k for k in COMBINATORS if k in schema]
    count = count_limits(schema, path)
    if ((not keys and count is None) or (keys and set(keys) <= {"anyOf"})
            or "$ref" in schema or "const" in schema or "enum" in schema):
        return NOT_PLANNED
    if set(keys) == {"oneOf"} and isinstance(schema["oneOf"], list):
        # exclusive branches (types, discriminators): plain alternation, each branch in its own order
        scratch = ctx.scratch()
        rest = {k: v for k, v in schema.items() if k != "oneOf"}
        merged = [merge(deref(b, ctx), rest, scratch, path) for b in schema["oneOf"]]
        if not scratch.problems and branches_disjoint(merged, ctx):
            return NOT_PLANNED
    if set(keys) == {"allOf"}:
        scratch = ctx.scratch()
        merged = merge_all_of(schema, scratch, path)
        if not scratch.problems and (not isinstance(merged, dict) or not any(k in merged for k in COMBINATORS)):
            return NOT_PLANNED  # a plain merge is exact and smaller
    types = schema.get("type", list(TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in TYPES for t in types):
        return NOT_PLANNED
    base = {k: v for k, v in schema.items() if k not in COMBINATORS}
    props = base.get("properties", {})
    if (not isinstance(props, dict) or base.get("patternProperties")
            or any(k in base and not trivial(k, base[k]) for k in REFUSED)):
        return NOT_PLANNED

    def resolve_ref(ref: Any) -> Any:
        target = resolve(ref, ctx.scratch(), path)
        if target is UNRESOLVED:
            raise NotPresenceOnly(f"$ref {ref!r}")
        return target

    def merge_cells(a: Any, b: Any) -> Any:
        scratch = ctx.scratch()
        out = merge(a, deref(b, ctx), scratch, path)
        return None if scratch.problems or out is False else out

    try:
        plan = plan_object(schema, declared=props, addl=base.get("additionalProperties", True),
                           base_types=types, resolve=resolve_ref, merge=merge_cells, count=count)
    except NotPresenceOnly:
        return NOT_PLANNED
    parts = [object_regex(base, ctx, path, plan)] if "object" in types else []
    others = [t for t in plan.other_types if not (t == "integer" and "number" in plan.other_types)]
    parts += [ctx.build(t, base, path) for t in others]
    return alt(parts)


def object_regex(schema: dict, ctx: Ctx, path: str, plan: Plan | None = None) -> str | None:
    """Objects: declared properties in schema order; ``plan`` (see object_presence) restricts
    which of the properties it mentions are present and with which value cells."""
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise GrammarCompileError(f"properties at {path or '/'} must be an object")
    required = schema.get("required", [])
    if not isinstance(required, list):
        required = []
    addl = schema.get("additionalProperties", True)
    mn = nonneg_int(schema, "minProperties", path, 0) or 0
    mx = nonneg_int(schema, "maxProperties", path, None)

    # free values in an object the schema asks for (type: object) nest max_any_depth deep; in one
    # that is only allowed (no type: any value) one less, as the object itself counts (DFA size)
    free_depth = ctx.max_any_depth if "type" in schema else ctx.max_any_depth - 1
    pprops = schema.get("patternProperties") or {}
    if not isinstance(pprops, dict):
        raise GrammarCompileError(f"patternProperties at {path or '/'} must be an object")

    if plan is not None and not plan.worlds:
        return None  # the combinators hold on no object
    if not props and not required and (plan is None or not plan.props):
        return _map_regex(pprops, addl, mn, mx, free_depth, ctx, path)

    relevant = set(plan.props) if plan else set()
    # (key regex, value regexes (cells of a planned property), required, planned)
    entries: list[tuple[str, list[str | None], bool, bool]] = []

    def addl_value(name: str) -> str | None:
        matching = _matching_patterns(pprops, name, ctx, path)
        if matching:  # additionalProperties does not apply to names a patternProperties matches
            return ctx.node(merge_many(matching, ctx, path), f"{path}/patternProperties")
        if addl is False:
            return None
        return ctx.node(addl, f"{path}/additionalProperties") if addl is not True else any_value(free_depth)

    if pprops:  # declared properties whose names a pattern matches must satisfy its schema too
        props = {name: merge_many([sub, *_matching_patterns(pprops, name, ctx, path)], ctx, path)
                 for name, sub in props.items()}

    def planned(name: str) -> tuple[str, list[str | None], bool, bool]:
        cells = [ctx.node(c.schema, f"{path}/properties/{name}") for c in plan.cells[name]]  # type: ignore[union-attr]
        return lit(json_literal_text(name)), cells, False, True

    for name, sub in props.items():
        if name in relevant:
            entries.append(planned(name))
        else:
            entries.append((lit(json_literal_text(name)), [ctx.value(sub, f"{path}/properties/{name}")],
                            name in required, False))
    for name in required:
        if name not in props and name not in relevant:  # required but undeclared: typed by additionalProperties
            entries.append((lit(json_literal_text(name)), [addl_value(name)], True, False))
    for name in plan.props if plan else []:
        if name not in props:
            entries.append(planned(name))
    n_req = sum(1 for e in entries if e[2]) + (min((sum(x is not None for x in w) for w in plan.worlds), default=0)
                                                if plan else 0)
    counted = plan is not None and count_limits(schema, path) is not None
    if mn > n_req and not counted:
        ctx.refuse(path, "minProperties", "more than the required properties")
    if mx is not None and mx < len(entries) and not counted:
        ctx.refuse(path, "maxProperties", "fewer than the declared properties")
    worlds = frozenset(plan.worlds) if plan else frozenset({()})
    extra = None
    # other keys take scalar values (additionalProperties true or omitted): a free value after every
    # open object would make the grammar about twice as large
    opened = "additionalProperties" in schema or ctx.open_objects
    if opened and addl is not False and not pprops and mx is None and not counted and not (plan and plan.closed):
        names = [*props, *(r for r in required if isinstance(r, str)), *(plan.props if plan else [])]
        extra = other_pair(names, addl, ctx, f"{path}/additionalProperties", 0)
    return seq(r"\{", _object_body(entries, worlds, extra), r"\}")


def _map_regex(pprops: dict, addl: Any, mn: int, mx: int | None, free_depth: int, ctx: Ctx, path: str) -> str | None:
    """An object without declared properties: any keys (or those patternProperties match), values by
    additionalProperties (or the pattern's schema), between minProperties and maxProperties pairs."""
    if mn > 1:
        ctx.refuse(path, "minProperties", "above 1 on an object without declared properties")
    if pprops:
        pair = _pattern_pairs(pprops, ctx, path)
    else:
        value = ctx.node(addl, f"{path}/additionalProperties") if addl is not True else any_value(free_depth)
        pair = seq(STRING, ":", value)
    if pair is None:
        return seq(r"\{", r"\}") if mn == 0 else None
    if mx == 0:
        return r"\{\}"
    body = seq(pair, rep(seq(",", pair), 0, None if mx is None else mx - 1))
    return seq(r"\{", body if mn >= 1 else opt(body), r"\}")


def other_pair(names: list[str], addl: Any, ctx: Ctx, path: str, free_depth: int) -> str | None:
    """``"key":value`` for the keys an open object may have besides ``names`` (None when the
    value schema is not enforceable: those keys are then not generated, narrower)."""
    scratch = ctx.scratch(ctx.max_ref_depth, ctx.max_any_depth)
    scratch.deadline, scratch.max_regex_chars = ctx.deadline, ctx.max_regex_chars
    scratch.ref_depth = dict(ctx.ref_depth)
    value = scratch.node(addl, path) if addl is not True else any_value(free_depth)
    return None if value is None or scratch.problems else seq(other_key(names), ":", value)


def _matching_patterns(pprops: dict, name: str, ctx: Ctx, path: str) -> list:
    import re

    out = []
    for pat, sub in pprops.items():
        try:
            if re.search(pat, name):
                out.append(sub)
        except re.error:
            ctx.refuse(path, "patternProperties", f"pattern {pat!r} does not parse")
    return out


def _pattern_pairs(pprops: dict, ctx: Ctx, path: str) -> str | None:
    """``"key":value`` for keys some pattern matches (other keys are not generated: narrower).
    Exact when one pattern (or all patterns share one schema): a key two patterns match would
    need both schemas."""
    subs = list(pprops.values())
    if any(not json_eq(sub, subs[0]) for sub in subs[1:]):
        ctx.refuse(path, "patternProperties", "several patterns with different schemas")
        return None
    try:
        keys = alt([pattern_regex(p) for p in pprops])
    except PatternError as e:
        ctx.refuse(path, "patternProperties", str(e))
        return None
    return seq('"', keys, '":', ctx.node(subs[0], f"{path}/patternProperties"))


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
