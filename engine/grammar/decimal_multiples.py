"""``multipleOf`` a decimal step (0.01, 0.5, 0.25...) on numbers, exactly, as a regex over the digits.

x is a multiple of m = a * 10^-q (a an integer, q > 0) when x * 10^q is an integer multiple of a. When
a = 2^i * 5^j and d = max(i, j) <= q, that depends only on x's fraction: its digits past the q-th are
zeros, and its q digits (padded with zeros) end in one of the d-digit multiples of a. The fraction is
built digit by digit together with the number's bounds (as `regex_util.number_range` splits them by
integer part), so a step and a range are enforced at once. Other steps (0.3, 2.5) are spelled out
value by value when a bounded range holds few of them, and refused otherwise.

Semantics are the exact decimal ones JSON Schema states (19.99 is a multiple of 0.01), not a float
division's (which says it is not): the registry checks tool arguments the same way.
"""
from __future__ import annotations

import functools
import math
from decimal import Decimal

from .regex_util import PatternError, _split, alt, nonneg_int_range, number_range, suffix_digits

_MAX_LISTED = 256


def step_parts(m: Decimal) -> tuple[int, int]:
    """(a, q) with m = a * 10^-q, a an integer and q >= 0 as small as possible."""
    _, digits, exp = m.normalize().as_tuple()
    a = int("".join(map(str, digits)))
    return (a, -exp) if exp < 0 else (a * 10**exp, 0)


def integer_step(m: Decimal) -> int:
    """The integers that are multiples of m are exactly the multiples of this integer."""
    a, q = step_parts(m)
    return a // math.gcd(a, 10**q)


def multiples_regex(m: Decimal, lo, lo_incl: bool, hi, hi_incl: bool) -> str | None:
    """Regex for JSON numbers (no exponent) x with lo <=/< x <=/< hi (Decimals or None) that are
    multiples of the decimal ``m`` > 0 with a fraction; PatternError when that cannot be written exactly."""
    a, q = step_parts(m)
    d = suffix_digits(a)
    if d is not None and d <= q:
        suffixes = frozenset(str(v).zfill(d) for v in range(0, 10**d, a)) if d else frozenset({""})
        return number_range(lo, lo_incl, hi, hi_incl, functools.partial(_magnitudes, q=q, suffixes=suffixes))
    if lo is not None and hi is not None:
        first, last = math.ceil(lo / m), math.floor(hi / m)
        if not lo_incl and first * m == lo:
            first += 1
        if not hi_incl and last * m == hi:
            last -= 1
        if last - first + 1 <= _MAX_LISTED:
            return alt([_written(k * m) for k in range(first, last + 1)])
    raise PatternError(f"multiples of {m} over an unbounded or large range (only steps whose fraction "
                       "decides them, like 0.01, 0.5 or 0.25, are enforced on any range)")


def _written(x: Decimal) -> str:
    """Every way to write x without exponent: trailing zeros in the fraction, or none."""
    neg = x < 0
    ip, frac = _split(-x if neg else x)
    body = f"{ip}\\.{frac}0*" if frac else f"{ip}(?:\\.0+)?"
    return ("-" if neg and x != 0 else "") + body


def _magnitudes(lo, lo_incl: bool, hi, hi_incl: bool, *, q: int, suffixes: frozenset[str]) -> str | None:
    """Non-negative multiples in the range, split by integer part like `nonneg_decimal_range`."""
    ilo, dlo = _split(lo)
    if hi is None:
        return alt([_with_fraction(ilo, ilo, dlo, lo_incl, None, True, q, suffixes),
                     _with_fraction(ilo + 1, None, None, True, None, True, q, suffixes)])
    ihi, dhi = _split(hi)
    if ilo == ihi:
        return _with_fraction(ilo, ilo, dlo, lo_incl, dhi, hi_incl, q, suffixes)
    return alt([_with_fraction(ilo, ilo, dlo, lo_incl, None, True, q, suffixes),
                _with_fraction(ilo + 1, ihi - 1, None, True, None, True, q, suffixes) if ihi - 1 >= ilo + 1 else None,
                _with_fraction(ihi, ihi, None, True, dhi, hi_incl, q, suffixes)])


def _with_fraction(ilo: int, ihi: int | None, dlo: str | None, lo_incl: bool, dhi: str | None, hi_incl: bool,
                   q: int, suffixes: frozenset[str]) -> str | None:
    ints = nonneg_int_range(ilo, ihi)
    frac = _Fraction(dlo, lo_incl, dhi, hi_incl, q, suffixes).regex()
    return None if ints is None or frac is None else f"(?:{ints}){frac}"


class _Fraction:
    """The optional ``.digits`` F of a number whose integer part is fixed, with 0.lo <=/< 0.F <=/< 0.hi
    (``lo`` / ``hi`` digit strings without trailing zeros, None = no bound), no non-zero digit past the
    q-th, and the q-digit padding of F ending in one of ``suffixes`` (each d digits long)."""

    def __init__(self, lo: str | None, lo_incl: bool, hi: str | None, hi_incl: bool, q: int, suffixes: frozenset[str]):
        self.lo, self.lo_incl, self.hi, self.hi_incl = lo, lo_incl, hi, hi_incl
        self.q, self.suffixes = q, suffixes
        self.d = len(next(iter(suffixes)))
        self.end = max(q, len(lo or ""), len(hi or ""))  # from here on only zeros, and nothing changes
        self._memo: dict[tuple, str | None] = {}

    def regex(self) -> str | None:
        stop, steps = self._choices(0, self.lo is not None, self.hi is not None, "")
        digits = alt([f"{cls}{self._rest(*nxt)}" for cls, nxt in steps if self._rest(*nxt) is not None])
        if digits is None:
            return "" if stop else None
        return f"(?:\\.{digits})?" if stop else f"\\.{digits}"

    def _rest(self, i: int, lo_tight: bool, hi_tight: bool, tail: str) -> str | None:
        """Regex for the digits from position ``i`` on (ending there included); memoized per state."""
        key = (i, lo_tight, hi_tight, tail)
        if key not in self._memo:
            self._memo[key] = self._build_rest(*key)
        return self._memo[key]

    def _build_rest(self, i: int, lo_tight: bool, hi_tight: bool, tail: str) -> str | None:
        stop, steps = self._choices(i, lo_tight, hi_tight, tail)
        if i >= self.end:  # only zeros from here, and they change nothing
            return "0*" if stop else None
        body = alt([f"{cls}{rest}" for cls, nxt in steps if (rest := self._rest(*nxt)) is not None])
        if not stop:
            return body
        return "" if body is None else f"(?:{body})?"

    def _choices(self, i: int, lo_tight: bool, hi_tight: bool, tail: str):
        """(whether F may end before position i, [(digit class, state after it)])."""
        lo_left = lo_tight and i < len(self.lo)  # F so far equals lo's start and lo goes on: F < lo
        hi_left = hi_tight and i < len(self.hi)
        stop = ((not lo_tight or (not lo_left and self.lo_incl)) and (not hi_tight or hi_left or self.hi_incl)
                and (tail + "0" * self.d)[:self.d] in self.suffixes)  # the digits left out are zeros
        lo_digit = int(self.lo[i]) if lo_left else 0
        hi_digit = int(self.hi[i]) if hi_left else (9 if not hi_tight else 0)
        in_suffix = self.q - self.d <= i < self.q
        groups: dict[tuple, list[int]] = {}
        for c in range(lo_digit, min(hi_digit, 9 if i < self.q else 0) + 1):
            new_tail = tail + str(c) if in_suffix else tail
            if in_suffix and not any(s.startswith(new_tail) for s in self.suffixes):
                continue
            nxt = (i + 1, lo_tight and c == lo_digit, hi_tight and c == hi_digit, new_tail)
            groups.setdefault(nxt, []).append(c)
        return stop, [(_digit_class(cs), nxt) for nxt, cs in groups.items()]


def _digit_class(cs: list[int]) -> str:
    if len(cs) == 1:
        return str(cs[0])
    if cs == list(range(cs[0], cs[-1] + 1)):
        return f"[{cs[0]}-{cs[-1]}]"
    return "[" + "".join(map(str, cs)) + "]"
