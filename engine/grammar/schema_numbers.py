"""null, boolean, integer and number: bounds and ``multipleOf`` (integers and decimal steps) as exact
digit regexes."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from .decimal_multiples import integer_step, multiples_regex
from .errors import GrammarCompileError
from .dfa_ops import MAX_MODULUS
from .regex_util import BOOLEAN, INTEGER, NULL, NUMBER, PatternError, int_range, multiples_of, number_range
from .schema_context import Ctx

def null_regex(schema: dict, ctx: Ctx, path: str) -> str:
    return NULL


def boolean_regex(schema: dict, ctx: Ctx, path: str) -> str:
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


def integer_regex(schema: dict, ctx: Ctx, path: str) -> str | None:
    """Integers; also written with a zero fraction ("1.0" is an integer in JSON Schema)."""
    r = _integer_digits(schema, ctx, path)
    if r is None or not ctx.float_ints:
        return r
    return f"(?:{r})" + r"(?:\.0+)?"


def _integer_digits(schema: dict, ctx: Ctx, path: str) -> str | None:
    import math

    k = _int_multiple(schema, path)
    lo, lo_incl, hi, hi_incl = _bounds(schema, path)
    ilo = None if lo is None else (math.ceil(lo) if lo_incl else math.floor(lo) + 1)
    ihi = None if hi is None else (math.floor(hi) if hi_incl else math.ceil(hi) - 1)
    if k is None:  # a decimal step: the integers among its multiples are those of an integer step
        k = integer_step(_dec(schema["multipleOf"], path, "multipleOf"))
    if k > 1:
        try:
            return multiples_of(k, ilo, ihi)
        except PatternError as e:
            digits = INTEGER if ilo is None and ihi is None else int_range(ilo, ihi)
            placeholder = None if digits is None or k > MAX_MODULUS else ctx.hole([digits, ("multiple_of", k)])
            if placeholder is None:
                ctx.refuse(path, "multipleOf", str(e))
            return placeholder
    if lo is None and hi is None:
        return INTEGER
    return int_range(ilo, ihi)


def number_regex(schema: dict, ctx: Ctx, path: str) -> str | None:
    k = _int_multiple(schema, path)
    lo, lo_incl, hi, hi_incl = _bounds(schema, path)
    if k is None:
        try:
            return multiples_regex(_dec(schema["multipleOf"], path, "multipleOf"), lo, lo_incl, hi, hi_incl)
        except PatternError as e:
            ctx.refuse(path, "multipleOf", str(e))
            return None
    if k > 1 or "multipleOf" in schema:
        # an integer multipleOf admits integers only (written as integers: narrower than 4.0)
        return integer_regex(schema, ctx, path)
    if lo is None and hi is None:
        return NUMBER
    try:
        return number_range(lo, lo_incl, hi, hi_incl)
    except PatternError as e:
        ctx.refuse(path, "minimum/maximum", str(e))
        return None
