"""Regex building blocks for compact JSON text, in the regex dialect outlines-core compiles
(Rust `regex-syntax`): literals, code-point sets, JSON string characters, and the
translation of a JSON Schema ``pattern`` (which matches the *decoded* string) into a regex
over the *encoded* JSON string text.

Strings use one canonical encoding per character, the one ``json.dumps(ensure_ascii=False)``
writes: ``\\"`` and ``\\\\``, the short escapes ``\\b \\f \\n \\r \\t``, ``\\u00xx`` (lower-case hex)
for the other control characters, every other character raw (UTF-8). One encoding per
character keeps length limits and patterns exact.

``None`` stands for the empty language ("never matches") throughout.
"""
from __future__ import annotations

import functools
import os
import re
from re import _constants as C  # noqa: N812 - the stdlib's parser constants
from re import _parser as sre_parse

MAX_CP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code-point ranges

_META = set("\\.+*?()|[]{}^$#&-~")
_SHORT_ESCAPES = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r", 0x22: '"', 0x5C: "\\"}


class PatternError(ValueError):
    """A `pattern` that cannot be translated exactly (the reason is the message)."""


# ----------------------------------------------------------------------------- combinators
def lit(text: str) -> str:
    """Regex matching exactly ``text``."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in _META:
            out.append("\\" + ch)
        elif cp < 0x20 or cp > 0x7E:
            out.append(f"\\x{{{cp:X}}}")
        else:
            out.append(ch)
    return "".join(out)


def seq(*parts: str | None) -> str | None:
    """Concatenation; empty language if any part is."""
    if any(p is None for p in parts):
        return None
    return "".join(parts)  # type: ignore[arg-type]


def alt(parts: list[str | None]) -> str | None:
    """Alternation of the non-empty languages (deduplicated, order kept)."""
    seen: list[str] = []
    for p in parts:
        if p is not None and p not in seen:
            seen.append(p)
    if not seen:
        return None
    if len(seen) == 1:
        return seen[0]
    return "(?:" + "|".join(seen) + ")"


def opt(part: str | None) -> str:
    """Zero or one occurrence (the empty string when ``part`` is the empty language)."""
    return "" if part is None else f"(?:{part})?"


def rep(part: str | None, lo: int, hi: int | None) -> str | None:
    """``part`` repeated lo..hi times (hi None = unbounded)."""
    if part is None:
        return "" if lo == 0 else None
    if hi is not None and hi < lo:
        return None
    if hi == 0:
        return ""
    if lo == 0 and hi is None:
        return f"(?:{part})*"
    if lo == 1 and hi is None:
        return f"(?:{part})+"
    if lo == hi:
        return part if lo == 1 else f"(?:{part}){{{lo}}}"
    return f"(?:{part}){{{lo},{'' if hi is None else hi}}}"


# ----------------------------------------------------------------------------- code-point sets
def normalize(ranges: Ranges) -> Ranges:
    """Sort and merge ranges, dropping the surrogate block (not Unicode scalar values)."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


def complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return normalize(out)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    return complement(complement(a) + complement(b))


def char_class(ranges: Ranges) -> str | None:
    """A regex class for a code-point set (None when empty)."""
    ranges = normalize(ranges)
    if not ranges:
        return None
    body = "".join(f"\\x{{{lo:X}}}" if lo == hi else f"\\x{{{lo:X}}}-\\x{{{hi:X}}}" for lo, hi in ranges)
    return f"[{body}]"


def _escape_of(cp: int) -> str:
    if cp in _SHORT_ESCAPES:
        return "\\" + _SHORT_ESCAPES[cp]
    return f"\\u{cp:04x}"


_RAW = normalize([(0x20, 0x21), (0x23, 0x5B), (0x5D, MAX_CP)])
_NEEDS_ESCAPE = [cp for cp in range(0x20)] + [0x22, 0x5C]


def json_chars(ranges: Ranges) -> str | None:
    """Regex for one JSON-encoded string character whose decoded code point is in ``ranges``."""
    ranges = normalize(ranges)
    parts = [char_class(intersect(ranges, _RAW))]
    covered = [cp for cp in _NEEDS_ESCAPE if any(lo <= cp <= hi for lo, hi in ranges)]
    if len(covered) == len(_NEEDS_ESCAPE):
        parts.append(STRING_ESCAPE)
    else:
        parts.extend(lit(_escape_of(cp)) for cp in covered)
    return alt(parts)


STRING_ESCAPE = r'\\(?:["\\bfnrt]|u00(?:0[0-7bef]|1[0-9a-f]))'
STRING_CHAR = json_chars([(0, MAX_CP)])
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
BOOLEAN = r"(?:true|false)"
NULL = "null"


def json_literal_text(value: object) -> str:
    """The canonical compact JSON text of a value (what the grammar generates for it)."""
    import json

    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_value_regex(value: object, zero_fraction: bool = True, max_permuted_keys: int = 4) -> str:
    """Regex for the compact JSON texts equal to ``value`` under JSON Schema equality (enum/const):
    numbers by value (``1``, ``1.0``, ``1.00``; ``1.5``, ``1.50``; exponents only as Python writes them), objects with
    their keys in any order (up to ``max_permuted_keys`` keys; larger objects in the given order
    only, which is narrower, never wider). ``zero_fraction=False`` keeps integers without a
    fraction (drafts 3/4, where 1.0 is not an integer, when a type check sits beside the enum)."""
    import itertools
    from decimal import Decimal

    if isinstance(value, bool) or value is None or isinstance(value, str):
        return lit(json_literal_text(value))
    if isinstance(value, (int, float)):
        text = json_literal_text(value)  # raises ValueError for NaN / inf
        d = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
        if d == d.to_integral_value():
            plain = lit(str(int(d))) + (r"(?:\.0+)?" if zero_fraction else "")
        else:
            plain = lit(format(d, "f").rstrip("0")) + "0*"  # 1.5 == 1.50
        # Python writes large/tiny floats with an exponent (1e+300): that text too
        return alt([plain, lit(text)]) if "e" in text else plain  # type: ignore[return-value]
    if isinstance(value, list):
        return r"\[" + ",".join(json_value_regex(v, zero_fraction, max_permuted_keys) for v in value) + r"\]"
    if isinstance(value, dict):
        pairs = [lit(json_literal_text(k)) + ":" + json_value_regex(v, zero_fraction, max_permuted_keys)
                 for k, v in value.items()]
        orders = itertools.permutations(pairs) if len(pairs) <= max_permuted_keys else [pairs]
        return r"\{" + (alt([",".join(o) for o in orders]) or "") + r"\}"
    raise ValueError(f"not a JSON value: {value!r}")


# ----------------------------------------------------------------------------- string formats
_D2 = "[0-9]{2}"
# Gregorian leap years (4-digit): divisible by 4 and not by 100, or divisible by 400
# (year 0000 is left out: RFC 3339 allows it, Python's date parser, used by validators, does not)
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    rf"|{_LEAP_YEAR}-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_POINTER = "(?:/(?:" + json_chars(complement([(0x2F, 0x2F), (0x7E, 0x7E)])) + "|~[01])*)*"
# RFC 3986 URI: scheme ":" hier-part ["?" query] ["#" fragment]; the authority's host as a reg-name
# (which covers IPv4 and DNS names; IP literals in brackets are left out) and a port of 1-5 digits
_PCHAR = r"(?:[A-Za-z0-9._~!$&'()*+,;=:@\-]|%[0-9A-Fa-f]{2})"
_AUTHORITY = (r"(?:(?:[A-Za-z0-9._~!$&'()*+,;=:\-]|%[0-9A-Fa-f]{2})*@)?"
              r"(?:[A-Za-z0-9._~!$&'()*+,;=\-]|%[0-9A-Fa-f]{2})*(?::[0-9]{1,5})?")
_URI = (rf"[A-Za-z][A-Za-z0-9+.\-]*:(?://{_AUTHORITY}(?:/{_PCHAR}*)*|/(?:{_PCHAR}+(?:/{_PCHAR}*)*)?"
        rf"|{_PCHAR}+(?:/{_PCHAR}*)*)?(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?")
# RFC 6570 level 4: literal characters (ASCII here; pct-encoded) and {expressions} of variables
_PCT = "%[0-9A-Fa-f]{2}"
_VARCHAR = f"(?:[A-Za-z0-9_]|{_PCT})"
_VARSPEC = rf"{_VARCHAR}(?:\.?{_VARCHAR})*(?::[1-9][0-9]{{0,3}}|\*)?"
_URI_TEMPLATE = (rf"(?:[!#$&(-;=?-\[\]_a-z~]|{_PCT}"
                 rf"|\{{[+#./;?&=,!@|]?{_VARSPEC}(?:,{_VARSPEC})*\}})*")
# Conservative on purpose: every string these accept is valid for any common validator
# (a format regex that is too wide would let invalid output through; too narrow only loses coverage).
FORMATS: dict[str, str] = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*@" + _LABEL + r"(?:\." + _LABEL + r")*\.[A-Za-z]{2,24}",
    "uri": _URI,
    "ipv4": _OCTET + r"(?:\." + _OCTET + "){3}",
    "hostname": _LABEL + r"(?:\." + _LABEL + r")*",
    # RFC 6901: "/"-separated tokens, "~" only as "~0" or "~1"
    "json-pointer": _POINTER,
    "relative-json-pointer": r"(?:0|[1-9][0-9]*)(?:#|" + _POINTER + ")",
    "uri-template": _URI_TEMPLATE,
}


# ----------------------------------------------------------------------------- pattern -> regex
_ALL_START = 0


def _all_chars() -> str:
    """Every code point in order, surrogates replaced by NUL (which no category matches)."""
    return "".join(chr(cp) if not (_SURROGATES[0] <= cp <= _SURROGATES[1]) else "\0" for cp in range(MAX_CP + 1))


def _category(name: str) -> tuple[Ranges, Ranges]:
    """(lower, upper) bounds of a regex category: lower is in every dialect's set
    (ECMA-262 and Python's Unicode one), upper contains every dialect's set."""
    return _categories()[name]


@functools.cache
def _categories() -> dict[str, tuple[Ranges, Ranges]]:
    """`_category` of each name, kept on disk per Python version (its ``re`` and Unicode tables define
    them): scanning every code point takes ~0.25 s, which each compile worker paid as it started."""
    import json
    import sys
    import unicodedata

    from .disk_cache import cache_base

    path = os.path.join(cache_base(), "unicode", f"categories-{sys.version_info[0]}.{sys.version_info[1]}-"
                        f"{unicodedata.unidata_version}.json")
    try:
        with open(path) as f:
            return {name: (_ranges(lo), _ranges(hi)) for name, (lo, hi) in json.load(f).items()}
    except (OSError, ValueError, TypeError):
        pass
    every = _all_chars()

    def ranges_where(cat: str) -> Ranges:
        # one C-level scan over every code point, as runs of matching characters
        return [(_ALL_START + m.start(), _ALL_START + m.end() - 1) for m in re.finditer(cat + "+", every)]

    space = normalize([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                       (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)])
    out = {}
    for name, ascii_, cat in [("digit", [(0x30, 0x39)], r"\d"),
                              ("word", [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)], r"\w"),
                              ("space", space, r"\s")]:
        uni = ranges_where(cat)
        out[name] = (intersect(ascii_, uni), normalize(ascii_ + uni))
    try:  # written whole under a unique name, then renamed: concurrent workers never read half a file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: computed again next time
    return out


def _ranges(pairs: list) -> Ranges:
    return [(int(lo), int(hi)) for lo, hi in pairs]


_CATS = {
    C.CATEGORY_DIGIT: ("digit", False), C.CATEGORY_NOT_DIGIT: ("digit", True),
    C.CATEGORY_WORD: ("word", False), C.CATEGORY_NOT_WORD: ("word", True),
    C.CATEGORY_SPACE: ("space", False), C.CATEGORY_NOT_SPACE: ("space", True),
}
# ECMA-262 '.' excludes line terminators; Python's excludes only '\n': take the smaller set.
_DOT = complement([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)])


def _cat_set(code, lower: bool) -> Ranges:
    name, negated = _CATS[code]
    lo, hi = _category(name)
    # a negated category's lower bound is the complement of the positive upper bound
    if negated:
        return complement(hi) if lower else complement(lo)
    return lo if lower else hi


def _class_set(items, lower: bool = True) -> Ranges:
    """The code points a parsed `[...]` class surely matches (lower) in every dialect."""
    negate = bool(items) and items[0][0] is C.NEGATE
    body = items[1:] if negate else items
    acc: Ranges = []
    for op, av in body:
        if op is C.LITERAL:
            acc.append((av, av))
        elif op is C.RANGE:
            acc.append(av)
        elif op is C.CATEGORY:
            acc.extend(_cat_set(av, lower != negate))
        else:
            raise PatternError(f"unsupported class item {op}")
    acc = normalize(acc)
    return complement(acc) if negate else acc


class _Translator:
    def __init__(self, pattern: str):
        try:
            parsed = sre_parse.parse(pattern)
        except re.error as e:
            raise PatternError(f"pattern {pattern!r} does not parse: {e}") from None
        if parsed.state.flags & ~(re.UNICODE | 0):
            raise PatternError(f"pattern {pattern!r} uses inline flags")
        self.parsed = parsed

    def translate(self) -> str | None:
        items = list(self.parsed)
        branches = items[0][1][1] if len(items) == 1 and items[0][0] is C.BRANCH else [items]
        out = []
        for br in branches:
            br = list(br)
            start = bool(br) and br[0][0] is C.AT and br[0][1] in (C.AT_BEGINNING, C.AT_BEGINNING_STRING)
            if start:
                br = br[1:]
            end = bool(br) and br[-1][0] is C.AT and br[-1][1] in (C.AT_END, C.AT_END_STRING)
            if end:
                br = br[:-1]
            body = self.seq(br)
            any_ = f"{STRING_CHAR}*"
            out.append(seq("" if start else any_, body, "" if end else any_))
        return alt(out)

    def seq(self, items) -> str | None:
        return seq(*[self.node(op, av) for op, av in items])

    def node(self, op, av) -> str | None:
        if op is C.LITERAL:
            return json_chars([(av, av)])
        if op is C.NOT_LITERAL:
            return json_chars(complement([(av, av)]))
        if op is C.ANY:
            return json_chars(_DOT)
        if op is C.IN:
            return json_chars(_class_set(av))
        if op is C.BRANCH:
            return alt([self.seq(b) for b in av[1]])
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError("inline flags in a group")
            return f"(?:{s})" if (s := self.seq(sub)) is not None else None
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            if op is C.POSSESSIVE_REPEAT:
                raise PatternError("possessive repeat")
            lo, hi, sub = av
            return rep(self.seq(sub), lo, None if hi is C.MAXREPEAT else hi)
        raise PatternError(f"{str(op).lower()} (anchors inside the pattern, look-around, back-references, word boundaries) cannot be expressed")


def pattern_regex(pattern: str, min_len: int = 0, max_len: int | None = None) -> str | None:
    """Regex over JSON string *content* (no quotes) for strings ``pattern`` finds a match in
    (and whose length in code points is within [min_len, max_len]).

    Exact for the common subset of ECMA-262 and Python ``re``; where the dialects differ
    (``\\d``, ``\\w``, ``\\s``, ``.``) it takes the intersection, so it never admits a string
    one of them would reject. Raises PatternError for constructs it cannot express, and for
    length limits it cannot fold into the pattern (see ``_fold_length``).
    """
    tr = _Translator(pattern)
    if min_len > 0 or max_len is not None:
        if not _fold_length(tr, min_len, max_len):
            return None
    return tr.translate()


def length_bounds(regex_text: str) -> tuple[int, int | None]:
    """(min, max) length in code points of the strings a fully anchored Python-syntax regex matches
    (max None = unbounded); used for formats, whose regexes match the whole string."""
    lo, hi = sre_parse.parse(regex_text).getwidth()
    return lo, (None if hi >= C.MAXREPEAT - 1 else hi)


def _fold_length(tr: "_Translator", mn: int, mx: int | None) -> bool:
    """Intersect the parsed pattern with mn <= length <= mx in place; False when nothing is left.

    Possible when the limits are implied by the pattern, or when the pattern is anchored at both
    ends and has one variable-length part: a repeat of a single character (``^[A-Z]{2}[a-z]+$``),
    whose bounds then absorb the limits. Raises PatternError otherwise."""
    items = list(tr.parsed)
    anchored = (len(items) >= 2 and items[0][0] is C.AT and items[0][1] in (C.AT_BEGINNING, C.AT_BEGINNING_STRING)
                and items[-1][0] is C.AT and items[-1][1] in (C.AT_END, C.AT_END_STRING))
    lo, hi = tr.parsed.getwidth()
    hi = hi if anchored and hi < C.MAXREPEAT - 1 else None
    if lo >= mn and (mx is None or (hi is not None and hi <= mx)):
        return True  # the pattern already implies the limits
    if (mx is not None and lo > mx) or (hi is not None and hi < mn):
        return False
    body = items[1:-1] if anchored else []
    if any(op is C.BRANCH or op is C.AT for op, _ in body):
        body = []
    variable = [i for i, (op, av) in enumerate(body) if sre_parse.SubPattern(tr.parsed.state, [(op, av)]).getwidth()[0]
                != sre_parse.SubPattern(tr.parsed.state, [(op, av)]).getwidth()[1]]
    if not anchored or len(variable) != 1:
        raise PatternError("minLength/maxLength beside a pattern that is not anchored with one variable part")
    i = variable[0]
    op, av = body[i]
    if op is not C.MAX_REPEAT or sre_parse.SubPattern(tr.parsed.state, list(av[2])).getwidth() != (1, 1):
        raise PatternError("minLength/maxLength beside a pattern whose variable part is not a repeated character")
    fixed = lo - av[0]
    r_lo = max(av[0], mn - fixed)
    r_hi = av[1] if mx is None else min(av[1], mx - fixed)
    if r_hi < r_lo:
        return False
    tr.parsed[i + 1] = (op, (r_lo, r_hi, av[2]))
    return True


# ----------------------------------------------------------------------------- numeric ranges
def _same_len(a: str, b: str) -> str:
    """Regex for decimal digit strings of equal length between a and b (inclusive)."""
    if a == b:
        return a
    i = 0
    while a[i] == b[i]:
        i += 1
    prefix, a, b = a[:i], a[i:], b[i:]
    k = len(a) - 1
    if k == 0:
        return prefix + (f"[{a}-{b}]" if a != b else a)
    parts = []
    if a[1:] == "0" * k:
        lo_first = int(a[0])
    else:
        parts.append(a[0] + _paren(_same_len(a[1:], "9" * k)))
        lo_first = int(a[0]) + 1
    if b[1:] == "9" * k:
        hi_first = int(b[0])
        tail_b = None
    else:
        hi_first = int(b[0]) - 1
        tail_b = b[0] + _paren(_same_len("0" * k, b[1:]))
    if lo_first <= hi_first:
        d = str(lo_first) if lo_first == hi_first else f"[{lo_first}-{hi_first}]"
        parts.append(d + f"[0-9]{{{k}}}")
    if tail_b:
        parts.append(tail_b)
    return prefix + (parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")")


def _paren(r: str) -> str:
    return r if re.fullmatch(r"[0-9]*", r) else f"(?:{r})"


def nonneg_int_range(lo: int, hi: int | None) -> str | None:
    """Regex for canonical (no leading zeros) non-negative integers in [lo, hi]."""
    lo = max(lo, 0)
    if hi is not None and hi < lo:
        return None
    parts = []
    n_lo = len(str(lo))
    n_hi = len(str(hi)) if hi is not None else n_lo
    for n in range(n_lo, n_hi + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = min(hi, 10**n - 1) if hi is not None else 10**n - 1
        if a <= b:
            parts.append(_same_len(str(a), str(b)))
    if hi is None:
        parts.append(f"[1-9][0-9]{{{n_hi},}}")
    return alt(parts)


def int_range(lo: int | None, hi: int | None) -> str | None:
    """Regex for integers in [lo, hi] (None = unbounded)."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(nonneg_int_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        neg_lo = max(-hi, 1) if hi is not None else 1
        neg_hi = -lo if lo is not None else None
        m = nonneg_int_range(neg_lo, neg_hi)
        parts.append(None if m is None else "-" + _paren_alt(m))
    return alt(parts)


def _paren_alt(r: str) -> str:
    return f"(?:{r})"


# Fractions: the optional ".digits" after an integer part, as constraints on 0.F.
_FRAC_ANY = r"(?:\.[0-9]+)?"
_FRAC_ZERO = r"(?:\.0+)?"


def _digits_ge(d: str, incl: bool) -> str | None:
    """Non-empty digit strings F with 0.F >= 0.d (> when not incl); d has no trailing zeros."""
    if not d:
        return "[0-9]+" if incl else "[0-9]*[1-9][0-9]*"
    first, rest = int(d[0]), d[1:]
    parts = []
    if first < 9:
        parts.append(f"[{first + 1}-9][0-9]*")
    if rest:
        tail = _digits_ge(rest, incl)
    else:
        tail = "[0-9]*" if incl else "[0-9]*[1-9][0-9]*"
    parts.append(seq(str(first), None if tail is None else f"(?:{tail})"))
    return alt(parts)


def _digits_le(d: str, incl: bool) -> str | None:
    """Non-empty digit strings F with 0.F <= 0.d (< when not incl); d has no trailing zeros."""
    if not d:
        return "0+" if incl else None
    first, rest = int(d[0]), d[1:]
    parts = []
    if first > 0:
        parts.append(f"[0-{first - 1}][0-9]*")
    if rest:
        parts.append(f"{first}" + opt(_digits_le(rest, incl)))
    else:
        parts.append(f"{first}0*" if incl else None)
    return alt(parts)


def _frac_ge(d: str, incl: bool) -> str | None:
    if not d:
        return _FRAC_ANY if incl else r"\.[0-9]*[1-9][0-9]*"
    r = _digits_ge(d, incl)
    return None if r is None else rf"\.(?:{r})"


def _frac_le(d: str, incl: bool) -> str | None:
    if not d:
        return _FRAC_ZERO if incl else None
    return opt(seq(r"\.", f"(?:{_digits_le(d, incl)})"))


def _split(m) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros) of a non-negative Decimal."""
    from decimal import Decimal

    ip = int(m)
    frac = format(m - Decimal(ip), "f")
    digits = frac.split(".")[1].rstrip("0") if "." in frac else ""
    return ip, digits


def nonneg_decimal_range(lo, lo_incl: bool, hi, hi_incl: bool) -> str | None:
    """Regex for plain decimals (no sign, no exponent) m with lo <=/< m <=/< hi (hi None = inf).

    Raises PatternError for the one case it does not build: both bounds with fractions
    inside the same integer (e.g. 0.25 <= m <= 0.75).
    """
    ilo, dlo = _split(lo)
    if hi is None:
        return alt([seq(nonneg_int_range(ilo, ilo), _frac_ge(dlo, lo_incl)),
                     seq(nonneg_int_range(ilo + 1, None), _FRAC_ANY)])
    ihi, dhi = _split(hi)
    if ilo == ihi:
        if dlo == "" and lo_incl:
            return seq(nonneg_int_range(ilo, ilo), _frac_le(dhi, hi_incl))
        raise PatternError("number bounds with fractions inside one integer")
    return alt([
        seq(nonneg_int_range(ilo, ilo), _frac_ge(dlo, lo_incl)),
        seq(nonneg_int_range(ilo + 1, ihi - 1), _FRAC_ANY) if ihi - 1 >= ilo + 1 else None,
        seq(nonneg_int_range(ihi, ihi), _frac_le(dhi, hi_incl)),
    ])


def number_range(lo, lo_incl: bool, hi, hi_incl: bool, magnitude=None) -> str | None:
    """Regex for JSON numbers x (written without exponent) with lo <=/< x <=/< hi; bounds are
    Decimals or None (unbounded). Exact on the numbers it admits. ``magnitude(lo, lo_incl, hi, hi_incl)``
    (default `nonneg_decimal_range`) writes the admitted magnitudes; it must be symmetric under sign
    (as "a multiple of m" is)."""
    from decimal import Decimal

    magnitude = magnitude or nonneg_decimal_range
    zero = Decimal(0)
    parts = []
    if hi is None or hi > 0 or (hi == 0 and hi_incl):  # x >= 0 side
        if lo is None or lo < 0:
            m_lo, m_lo_incl = zero, True
        else:
            m_lo, m_lo_incl = lo, lo_incl
        parts.append(magnitude(m_lo, m_lo_incl, hi, hi_incl))
    if lo is None or lo < 0:  # x < 0 side: x = -m, m > 0
        if hi is None or hi >= 0:
            m_lo, m_lo_incl = zero, False
        else:
            m_lo, m_lo_incl = -hi, hi_incl
        m_hi, m_hi_incl = (None, True) if lo is None else (-lo, lo_incl)
        mag = magnitude(m_lo, m_lo_incl, m_hi, m_hi_incl)
        parts.append(None if mag is None else f"-(?:{mag})")
    return alt(parts)


def suffix_digits(k: int) -> int | None:
    """The d for which k divides 10^d (k = 2^i 5^j, d = max(i, j)): whether a number is a multiple of k
    then depends on its last d digits only. None for other k."""
    d, rest = 0, k
    for p in (2, 5):
        n = 0
        while rest % p == 0:
            rest, n = rest // p, n + 1
        d = max(d, n)
    return d if rest == 1 else None


def multiples_of(k: int, lo: int | None, hi: int | None, max_alternatives: int = 256) -> str | None:
    """Regex for the integers in [lo, hi] (None = unbounded) that are multiples of ``k`` >= 1.

    A bounded range with few multiples is listed; otherwise k must be 2^a * 5^b, whose
    multiples are decided by their last max(a, b) digits. Raises PatternError beyond that."""
    if lo is not None and hi is not None:
        first = -(-lo // k) * k
        if first > hi:
            return None
        if (hi - first) // k + 1 <= max_alternatives:
            return alt([str(v) for v in range(first, hi + 1, k)])
    d = suffix_digits(k)
    if d is None or 10 ** d // k > max_alternatives:
        raise PatternError(f"multiples of {k} over an unbounded or large range")
    if lo is not None or hi is not None:
        if not ((lo is None or lo <= 0) and (hi is None or hi >= 0) and (lo in (None, 0) or hi in (None, 0))):
            raise PatternError(f"multiples of {k} with bounds other than 0")
    small = [str(v) for v in range(0, 10 ** d, k)]  # at most d digits, no leading zeros
    suffixes = [str(v).zfill(d) for v in range(0, 10 ** d, k)]
    mag = alt(small + ([f"[1-9][0-9]*{alt(suffixes)}"] if d else []))
    if d == 0:
        mag = "(?:0|[1-9][0-9]*)"
    pos, neg = mag, "-" + f"(?:{mag})"
    if lo == 0:
        return pos
    if hi == 0:
        return alt(["0", neg])
    return alt([pos, neg])


# ----------------------------------------------------------------------------- complements of finite sets
NON_INTEGER = r"-?(?:0|[1-9][0-9]*)\.[0-9]*[1-9][0-9]*"  # numbers with a non-zero fraction (no exponent)


def strings_except(values: list[str]) -> str:
    """Regex for JSON strings (with quotes) whose decoded text is none of ``values`` (exact on the
    canonical encoding): a trie walk that leaves the trie, or stops where no value ends."""
    trie: dict = {}
    for v in values:
        node = trie
        for ch in v:
            node = node.setdefault(ch, {})
        node[None] = True

    def other(node: dict) -> str | None:
        kids = sorted(k for k in node if k is not None)
        parts = [None if None in node else ""]  # stopping here is fine unless a value ends here
        leave = json_chars(complement([(ord(k), ord(k)) for k in kids]))
        parts.append(seq(leave, f"{STRING_CHAR}*"))
        parts += [seq(json_chars([(ord(k), ord(k))]), other(node[k])) for k in kids]
        nonempty = [p for p in parts if p not in (None, "")]
        body = alt(nonempty)
        return body if "" not in parts else opt(body) if body is not None else ""

    return seq('"', other(trie), '"')  # type: ignore[return-value]


def numbers_except(values: list) -> str | None:
    """Regex for JSON numbers (no exponent) equal to none of ``values`` (Decimals): the open
    intervals between them. Raises PatternError when a gap lies inside one integer."""
    vs = sorted(set(values))
    bounds = [None, *vs, None]
    return alt([number_range(lo, False, hi, False) for lo, hi in zip(bounds, bounds[1:])])
