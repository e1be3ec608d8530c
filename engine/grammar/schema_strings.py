"""Strings (length, ``pattern``, ``format``) and enum / const values of any type."""
from __future__ import annotations

import json

from .errors import GrammarCompileError
from .regex_util import FORMATS, STRING_CHAR, PatternError, alt, json_value_regex, length_bounds, pattern_regex, rep, seq
from .schema_context import ASSERTED_FORMATS, ASSERTIONS, Ctx, has_ref, json_eq, nonneg_int

# A DFA counts a length limit position by position, ~14 states each for a JSON string character
# (UTF-8 continuations, escapes): 10,000 characters are 140k states (140 MB of table, 0.5 s).
MAX_COUNTED_CHARS = 10_000

# JSON Schema 2020-12's types of a Python JSON value (1.0 is an integer there)
_IS_TYPE = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def string_regex(schema: dict, ctx: Ctx, path: str) -> str | None:
    mn = nonneg_int(schema, "minLength", path, 0) or 0
    mx = nonneg_int(schema, "maxLength", path, None)
    for keyword, n in (("minLength", mn), ("maxLength", mx)):
        if n is not None and n > MAX_COUNTED_CHARS:  # refused by name (lenient: checked after generation)
            ctx.refuse(path, keyword, f"{n:,} characters: a grammar counts at most {MAX_COUNTED_CHARS:,}")
    mn = mn if mn <= MAX_COUNTED_CHARS else 0
    mx = mx if mx is None or mx <= MAX_COUNTED_CHARS else None
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
        return _intersection(schema, ctx, path, "+".join(constraints), fmt, pattern, mn, mx)
    if fmt:
        inner = FORMATS[fmt]
    elif pattern is not None:
        try:
            inner = pattern_regex(pattern, mn, mx)
        except PatternError as e:
            if not has_len:
                ctx.refuse(path, "pattern", str(e))
                return None
            return _intersection(schema, ctx, path, "pattern+minLength/maxLength", None, pattern, mn, mx)
    else:
        inner = rep(STRING_CHAR, mn, mx)
    return seq('"', inner, '"')


def _intersection(schema: dict, ctx: Ctx, path: str, keywords: str, fmt: str | None, pattern: str | None,
                  mn: int, mx: int | None) -> str | None:
    """A string that satisfies several of format / pattern / length limits: their regexes are
    intersected as automata (dfa_ops) and spliced in where this string's placeholder stands."""
    parts = [FORMATS[fmt]] if fmt else []
    if pattern is not None:
        try:
            parts.append(pattern_regex(pattern))
        except PatternError as e:
            ctx.refuse(path, "pattern", str(e))
            return None
    if mn > 0 or mx is not None:
        parts.append(("length", mn, mx))  # a counter of characters, built as an automaton (compile_job)
    if any(p is None for p in parts):
        return None  # one of them admits no string
    placeholder = ctx.hole(parts)  # type: ignore[arg-type]
    if placeholder is None:
        ctx.refuse(path, keywords, "these cannot be intersected in one regex")
        return None
    return seq('"', placeholder, '"')


def enum_regex(schema: dict, ctx: Ctx, path: str) -> str | None:
    import jsonschema

    values = [schema["const"]] if "const" in schema else schema["enum"]
    if "const" in schema and "enum" in schema:
        values = [v for v in schema["enum"] if json_eq(v, schema["const"])]
    if not isinstance(values, list):
        raise GrammarCompileError(f"enum at {path or '/'} must be an array")
    rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
    keep = None  # which values the keywords beside the enum admit (None: all)
    asserted = [k for k in rest if k in ASSERTIONS]
    types = rest.get("type")
    type_names = [types] if isinstance(types, str) else types
    if asserted == ["type"] and isinstance(type_names, list) and all(t in _IS_TYPE for t in type_names):
        keep = lambda v: any(_IS_TYPE[t](v) for t in type_names)  # noqa: E731 - the common case, without a validator
    elif asserted:
        if has_ref(rest):
            ctx.refuse(path, "enum", "beside a $ref")
            return None
        keep = jsonschema.Draft202012Validator(rest, format_checker=jsonschema.FormatChecker()).is_valid
    # 1.0 equals 1, but drafts 3/4 do not call it an integer: no zero fractions there beside a type check
    zero_fraction = ctx.float_ints or "integer" not in json.dumps(rest)
    out = []
    for v in values:
        if keep is not None and not keep(v):
            continue
        try:
            out.append(json_value_regex(v, zero_fraction))
        except ValueError:
            continue
    return alt(out)
