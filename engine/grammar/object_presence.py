"""Object schemas whose combinators (oneOf / anyOf / allOf / not / if-then-else / dependencies /
dependentRequired / dependentSchemas) only say *which properties are present* and *which of
a few values they take*: turned into a finite set of allowed "worlds".

A world fixes, for each property the combinators mention, either "absent" or one value
*cell*: a set of values on which every test the combinators apply to that property has a
known truth value (a literal from an enum/const; the whole base schema when no test needs
splitting it; base AND one test). Every world is evaluated against the combinator formula
exactly (JSON Schema semantics: oneOf = exactly one branch), and the object regex is the
union of the worlds that hold (see ``schema_objects.object_regex``). Cells that cannot be expressed
(e.g. "a string other than these enum values") are simply not offered: the grammar gets
narrower, never wider.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

COMBINATORS = ("oneOf", "anyOf", "allOf", "not", "dependencies", "dependentRequired", "dependentSchemas",
               "if", "then", "else")
_NO_ASSERT = {
    "$schema", "$id", "$comment", "$defs", "definitions", "$anchor", "$vocabulary", "title",
    "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "contentMediaType", "contentEncoding", "contentSchema",
}


class NotPresenceOnly(Exception):
    """The combinators assert something this module does not model (the message says what)."""


def _key(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True)


def _strip(schema: Any) -> Any:
    return {k: v for k, v in schema.items() if k not in _NO_ASSERT} if isinstance(schema, dict) else schema


@dataclass
class Cell:
    """A set of values of one property: ``schema`` describes it, ``truth`` maps each test's key to
    whether every value of the cell passes that test."""
    schema: Any
    truth: dict[str, bool] = field(default_factory=dict)


@dataclass
class Plan:
    """``props``: the mentioned properties (schema order, then undeclared ones by first mention);
    ``cells[p]``: value cells offered for p; ``worlds``: allowed tuples over ``props``
    (``None`` = absent, else an index into ``cells[p]``); ``other_types``: the non-object
    JSON types the combinators admit (their values are built from the base schema); ``closed``:
    some branch says additionalProperties: false, so keys beyond ``props`` would change the truth
    of the formula and must not be generated."""
    props: list[str]
    cells: dict[str, list[Cell]]
    worlds: set[tuple]
    other_types: list[str]
    closed: bool = False


class _Analysis:
    def __init__(self, resolve: Callable[[str], Any]):
        self.resolve = resolve
        self.tests: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.closed = False  # some branch says additionalProperties: false (every property matters)

    def mention(self, prop: Any) -> None:
        if not isinstance(prop, str):
            raise NotPresenceOnly("a property name that is not a string")
        if prop not in self.tests:
            self.tests[prop] = {}
            self.order.append(prop)

    def collect(self, c: Any, depth: int = 0) -> None:
        """Record every property (and test on its value) the constraint ``c`` mentions."""
        if depth > 16:
            raise NotPresenceOnly("$ref nesting")
        if isinstance(c, bool):
            return
        if not isinstance(c, dict):
            raise NotPresenceOnly("a subschema that is not an object")
        for k, v in c.items():
            if k in _NO_ASSERT or k == "type" or (k == "additionalProperties" and v in (True, {})):
                continue
            if k == "additionalProperties" and v is False and "patternProperties" not in c:
                self.closed = True
                for p in c.get("properties", {}):
                    self.mention(p)
                continue
            if k == "required":
                for p in v:
                    self.mention(p)
            elif k == "properties":
                for p, t in v.items():
                    self.mention(p)
                    self.tests[p][_key(t)] = t
            elif k in ("dependencies", "dependentRequired", "dependentSchemas"):
                for p, d in v.items():
                    self.mention(p)
                    if isinstance(d, list):
                        for q in d:
                            self.mention(q)
                    else:
                        self.collect(d, depth + 1)
            elif k in ("not", "if", "then", "else"):
                self.collect(v, depth + 1)
            elif k in ("allOf", "anyOf", "oneOf"):
                if not isinstance(v, list) or not v:
                    raise NotPresenceOnly(f"{k} that is not a non-empty array")
                for b in v:
                    self.collect(b, depth + 1)
            elif k == "$ref":
                self.collect(self.resolve(v), depth + 1)
            else:
                raise NotPresenceOnly(f"'{k}' inside a combinator")

    def holds(self, c: Any, world: dict[str, Cell | None] | None, typ: str, depth: int = 0) -> bool:
        """Whether constraint ``c`` holds on an object in ``world`` (``world`` None: a non-object of ``typ``)."""
        if isinstance(c, bool):
            return c
        for k, v in c.items():
            if k in _NO_ASSERT or (k == "additionalProperties" and v is not False):
                continue
            if k == "additionalProperties":  # false: only the properties this subschema declares
                props = c.get("properties", {})
                ok = world is None or all(q in props for q, cell in world.items() if cell is not None)
            elif k == "type":
                ts = {v} if isinstance(v, str) else set(v)
                if typ == "number" and "integer" in ts and "number" not in ts:
                    raise NotPresenceOnly("type integer tested on numbers")
                ok = typ in ts or (typ == "integer" and "number" in ts)
            elif k in ("then", "else"):
                continue  # evaluated with "if" (without an "if" they assert nothing)
            elif world is None:  # the object keywords below hold vacuously on non-objects
                ok = k not in ("not", "allOf", "anyOf", "oneOf", "$ref", "if") or self._applicator(k, v, world, typ, depth, c)
            elif k == "required":
                ok = all(world.get(p) is not None for p in v)
            elif k == "properties":
                ok = all(world.get(p) is None or world[p].truth[_key(t)] for p, t in v.items())
            elif k in ("dependencies", "dependentRequired", "dependentSchemas"):
                ok = all(world.get(p) is None
                         or (all(world.get(q) is not None for q in d) if isinstance(d, list)
                             else self.holds(d, world, typ, depth + 1))
                         for p, d in v.items())
            else:
                ok = self._applicator(k, v, world, typ, depth, c)
            if not ok:
                return False
        return True

    def _applicator(self, k: str, v: Any, world: Any, typ: str, depth: int, c: Any = None) -> bool:
        if k == "not":
            return not self.holds(v, world, typ, depth + 1)
        if k == "if":
            branch = c.get("then", True) if self.holds(v, world, typ, depth + 1) else c.get("else", True)
            return self.holds(branch, world, typ, depth + 1)
        if k == "$ref":
            return self.holds(self.resolve(v), world, typ, depth + 1)
        results = [self.holds(b, world, typ, depth + 1) for b in v]
        if k == "allOf":
            return all(results)
        if k == "anyOf":
            return any(results)
        return sum(results) == 1  # oneOf


def _finite(schema: Any) -> list | None:
    if isinstance(schema, dict) and ("const" in schema or "enum" in schema):
        return [schema["const"]] if "const" in schema else list(schema["enum"])
    return None


def _has_ref(x: Any) -> bool:
    if isinstance(x, dict):
        return "$ref" in x or any(_has_ref(v) for v in x.values())
    return isinstance(x, list) and any(_has_ref(v) for v in x)


def _constant(base: Any, test: Any) -> bool | None:
    """A test's truth on every value of ``base`` when it does not depend on the value, else None."""
    t, b = _strip(test), _strip(base)
    if t is True or t == {}:
        return True
    if t is False or t == {"not": {}} or t == {"not": True}:
        return False
    if isinstance(t, dict) and isinstance(b, dict):
        if all(k in b and b[k] == v for k, v in t.items()):
            return True  # the base already asserts all of it
        if set(t) == {"type"} and "type" in b:
            tt = {t["type"]} if isinstance(t["type"], str) else set(t["type"])
            bt = {b["type"]} if isinstance(b["type"], str) else set(b["type"])
            if "number" in tt:
                tt.add("integer")
            if bt <= tt:
                return True
            if not (bt & tt) and not ("number" in bt and "integer" in tt):
                return False
    return None


def _cells(base: Any, tests: dict[str, Any], merge: Callable[[Any, Any], Any],
           deref: Callable[[Any], Any] = lambda s: s) -> list[Cell]:
    """The value cells offered for one property (see the module docstring)."""
    import jsonschema

    base, tests = deref(base), {k: deref(t) for k, t in tests.items()}
    consts = {k: _constant(base, t) for k, t in tests.items()}
    open_tests = {k: t for k, t in tests.items() if consts[k] is None}
    values: list = []
    for t in [base, *open_tests.values()]:
        for v in _finite(t) or []:
            if not any(_key(v) == _key(u) for u in values):
                values.append(v)
    if values:
        if _has_ref(base) or any(_has_ref(t) for t in open_tests.values()):
            raise NotPresenceOnly("an enum test beside a $ref")
        check = lambda s, v: jsonschema.Draft202012Validator(s, format_checker=jsonschema.FormatChecker()).is_valid(v)  # noqa: E731
        cells = [Cell({"const": v}, {k: consts[k] if consts[k] is not None else check(tests[k], v) for k in tests})
                 for v in values if check(base, v)]
        # the base's values outside every listed one ("a string other than these") have no
        # regex here: not offered (narrower)
        return cells
    known = {q: bool(v) for q, v in consts.items() if v is not None}
    if not open_tests:
        return [Cell(base, known)]
    # cells "base and t" for each open test t whose relation to the other open tests is known,
    # else "base and all of them"; values failing every test are not offered (narrower)
    cells = []
    for k, t in open_tests.items():
        truth = {q: True if q == k else _relation(deref(t), deref(t2)) for q, t2 in open_tests.items()}
        if None not in truth.values() and (merged := merge(base, t)) is not None:
            cells.append(Cell(merged, {**known, **truth}))
    if not any(all(c.truth[q] for q in open_tests) for c in cells):
        merged = base
        for t in open_tests.values():
            merged = None if merged is None else merge(merged, t)
        if merged is not None:
            cells.append(Cell(merged, {**known, **{q: True for q in open_tests}}))
    return cells


def _relation(a: Any, b: Any) -> bool | None:
    """Whether every value passing ``a`` passes ``b`` (True), none does (False), or unknown (None)."""
    sa, sb = _strip(a), _strip(b)
    if isinstance(sa, dict) and isinstance(sb, dict):
        if all(k in sa and _key(sa[k]) == _key(v) for k, v in sb.items()):
            return True
        if set(sb) == {"type"} and "type" in sa:
            ta = {sa["type"]} if isinstance(sa["type"], str) else set(sa["type"])
            tb = {sb["type"]} if isinstance(sb["type"], str) else set(sb["type"])
            if "number" in tb:
                tb.add("integer")
            if ta <= tb:
                return True
            if not (ta & tb) and not ("number" in ta and "integer" in tb):
                return False
    return None


def plan_object(schema: dict, *, declared: dict[str, Any], addl: Any, base_types: list[str],
                resolve: Callable[[str], Any], merge: Callable[[Any, Any], Any],
                max_worlds: int = 4096, count: tuple[int, int | None] | None = None) -> Plan:
    """The allowed worlds of the object ``schema`` (its combinator keywords are the formula).

    ``declared``: the base properties (name -> schema), ``addl``: additionalProperties (the
    schema of mentioned-but-undeclared properties; False = they must be absent), ``merge(a, b)``:
    one schema for "a and b" or None; ``count``: (minProperties, maxProperties) to enforce over
    every property. Raises NotPresenceOnly when the combinators assert something else.
    """
    def deref(x: Any) -> Any:
        for _ in range(8):
            if not (isinstance(x, dict) and set(_strip(x)) == {"$ref"}):
                break
            x = resolve(x["$ref"])
        return x

    an = _Analysis(resolve)
    formula = {k: schema[k] for k in COMBINATORS if k in schema}
    an.collect(formula)
    required = {p for p in schema.get("required", []) if isinstance(p, str)}
    if an.closed or count:  # additionalProperties: false / a property count depend on every property
        for p in declared:
            an.mention(p)
        for p in required:
            an.mention(p)
    props = [p for p in declared if p in an.tests] + [p for p in an.order if p not in declared]
    if count and count[0] > len(props) and addl is not False and not an.closed:
        # only other keys could make up the count, and they are not generated: not "no value"
        raise NotPresenceOnly(f"minProperties {count[0]} above the {len(props)} properties it names")
    cells: dict[str, list[Cell]] = {}
    for p in props:
        base = declared.get(p, addl)
        cells[p] = [] if base is False else _cells(base, an.tests[p], merge, deref)
    n = 1
    for p in props:
        n *= len(cells[p]) + 1
    if n > max_worlds:
        raise NotPresenceOnly(f"{n} combinations of {len(props)} properties (limit {max_worlds})")
    worlds = set()
    choices = [([] if p in required else [None]) + list(range(len(cells[p]))) for p in props]
    for combo in itertools.product(*choices):
        world = {p: (None if c is None else cells[p][c]) for p, c in zip(props, combo)}
        present = sum(c is not None for c in combo)
        if count and (present < count[0] or (count[1] is not None and present > count[1])):
            continue
        if an.holds(formula, world, "object"):
            worlds.add(combo)
    others = [t for t in base_types if t != "object" and an.holds(formula, None, t)]
    return Plan(props, cells, worlds, others, an.closed)
