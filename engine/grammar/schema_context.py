"""What every part of the schema -> regex compile shares: the keyword tables, the compile context
(`Ctx`) and small helpers over schemas and values."""
from __future__ import annotations

import json
from typing import Any, Callable

from .errors import GrammarCompileError
from .regex_util import BOOLEAN, NULL, NUMBER, STRING, alt, opt

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


TYPES = ("null", "boolean", "object", "array", "string", "number", "integer")


# refused wherever they assert something (unless a branch below enforces them)
REFUSED = ("not", "if", "then", "else", "dependentSchemas", "dependencies", "dependentRequired",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems",
            "$dynamicRef", "$recursiveRef")


UNRESOLVED = object()


NOT_PLANNED = object()


SPLIT_MIN_CHARS = 2000  # a smaller object costs less inline than as a part of its own (and its splice)


class Ctx:
    """One compile's settings and findings. ``node`` compiles a subschema (the walker in
    schema_regex, handed in so the keyword families below it need not import it back) and
    ``build`` one type's builder; ``scratch`` is a lenient copy for trial compiles whose
    problems are only inspected."""

    def __init__(self, root: Any, lenient: bool, max_ref_depth: int, max_any_depth: int,
                 walk: Callable[[Any, Ctx, str], str | None], builders: dict[str, Callable[..., str | None]],
                 deadline: float | None = None, max_regex_chars: int = 4_000_000):
        self.deadline = deadline
        self.max_regex_chars = max_regex_chars
        self.root = root
        self.lenient = lenient
        self.max_ref_depth = max_ref_depth
        self.max_any_depth = max_any_depth
        self.problems: list[str] = []
        self.ref_depth: dict[str, int] = {}
        # parts a regex cannot say, built as DFAs and spliced in (dfa_ops): placeholder byte -> what the
        # part is the intersection of (regexes, ("multiple_of", k) integers); None: plain regexes only
        self.holes: dict[int, list[str | tuple[str, int]]] | None = None
        # with holes: an object-valued property's value becomes a part of its own (compiled once, kept by
        # the compile worker, spliced in), so a tool's arguments cost nothing in the next turn's grammar
        self.split_objects = False
        # keys a schema names no rule for (additionalProperties omitted) are generated after the named
        # ones (scalar values); False: only where additionalProperties is given, the narrower grammar a
        # compile falls back to when the open one is too large
        self.open_objects = True
        self._walk, self._builders = walk, builders
        # draft 6 on: 1.0 is an integer; drafts 3/4 said no
        dialect = str(root.get("$schema", "")) if isinstance(root, dict) else ""
        self.float_ints = not any(d in dialect for d in ("draft-03", "draft-04"))

    def refuse(self, path: str, keyword: str, why: str = "") -> None:
        self.problems.append(f"{keyword} at {path or '/'}" + (f" ({why})" if why else ""))

    def hole(self, regexes: list[str | tuple[str, int]]) -> str | None:
        """A placeholder for the text all ``regexes`` match (an intersection; ``("multiple_of", k)`` stands
        for the integers divisible by k), or None when this compile takes plain regexes only or has used
        every placeholder."""
        from .dfa_ops import PLACEHOLDERS, placeholder_regex

        if self.holes is None:
            return None
        for byte, known in self.holes.items():
            if known == regexes:
                return placeholder_regex(byte)
        if len(self.holes) == len(PLACEHOLDERS):
            return None
        byte = PLACEHOLDERS[len(self.holes)]
        self.holes[byte] = list(regexes)
        return placeholder_regex(byte)

    def value(self, schema: Any, path: str) -> str | None:
        """The regex of a property's value or an array's item: with `split_objects`, a placeholder for it
        when it is an object (or a choice of objects) of some size, compiled as a part of its own."""
        regex = self.node(schema, path)
        if not self.split_objects or regex is None or len(regex) < SPLIT_MIN_CHARS or not _objects(schema):
            return regex
        return self.hole([regex]) or regex

    def node(self, schema: Any, path: str) -> str | None:
        """The regex of the subschema at ``path`` (None: no value satisfies it)."""
        return self._walk(schema, self, path)

    def build(self, type_name: str, schema: dict, path: str) -> str | None:
        """The regex of ``schema``'s values of one JSON type."""
        return self._builders[type_name](schema, self, path)

    def scratch(self, max_ref_depth: int = 0, max_any_depth: int = 0) -> Ctx:
        """A lenient context on the same root for a trial compile."""
        trial = Ctx(self.root, True, max_ref_depth, max_any_depth, self._walk, self._builders)
        trial.open_objects = self.open_objects
        return trial


def _objects(schema: Any) -> bool:
    """Whether every value of ``schema`` is an object, as far as its top level says."""
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "object":
        return True
    branches = schema.get("anyOf", schema.get("oneOf"))
    return isinstance(branches, list) and bool(branches) and all(_objects(b) for b in branches)


def any_value(depth: int) -> str:
    """Any compact JSON value, nested at most ``depth`` containers deep."""
    scalars = [NULL, BOOLEAN, NUMBER, STRING]
    if depth <= 0:
        return alt(scalars)  # type: ignore[return-value]
    inner = any_value(depth - 1)
    obj = r"\{" + opt(f"{STRING}:{inner}(?:,{STRING}:{inner})*") + r"\}"
    arr = r"\[" + opt(f"{inner}(?:,{inner})*") + r"\]"
    return alt(scalars + [obj, arr])  # type: ignore[return-value]


def trivial(kw: str, value: Any) -> bool:
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


def nonneg_int(schema: dict, kw: str, path: str, default: int | None) -> int | None:
    v = schema.get(kw, default)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GrammarCompileError(f"{kw} at {path or '/'} must be a non-negative integer, got {v!r}")
    return v


def enum_values(schema: dict) -> list | None:
    """The values an enum/const allows (None when neither is there)."""
    if "const" in schema and "enum" in schema:
        return [v for v in schema["enum"] if json_eq(v, schema["const"])] if isinstance(schema["enum"], list) else None
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def json_eq(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def has_ref(x: Any) -> bool:
    if isinstance(x, dict):
        return "$ref" in x or any(has_ref(v) for v in x.values())
    if isinstance(x, list):
        return any(has_ref(v) for v in x)
    return False
