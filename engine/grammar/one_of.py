"""Proofs that two ``oneOf`` branches share no value (then "exactly one" is plain alternation).

Type / discriminator signatures first, then two sufficient checks:

- a branch with finitely many values (enum / const): none of its values is valid against the
  other branch, asked of the JSON Schema validator itself (exact, $refs resolved from the root);
- two string branches: the intersection of their regexes is empty. Each JSON string has one
  canonical encoding and string regexes admit exactly the canonical encodings of the valid
  strings, so no common text means no common value.
"""
from __future__ import annotations

import json

import numpy as np
from typing import Any

from . import quick
from .schema_context import ANNOTATIONS, Ctx
from .schema_refs import deref

_FINITE_KEYS = {"enum", "const"}


def finite_values(schema: Any) -> list | None:
    """The values an enum / const branch lists (None when it lists none)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def finite_disjoint(a: Any, b: Any, root: Any) -> bool:
    """True when ``a`` lists its values and none of those that ``a`` admits is valid against ``b``."""
    values = finite_values(a)
    if values is None:
        return False
    validator = _validator(root)
    if validator is None:
        return False
    try:
        return not any(_valid(validator, v, a) and _valid(validator, v, b) for v in values)
    except Exception:  # noqa: BLE001 - a schema the validator cannot read proves nothing
        return False


def _validator(root: Any) -> Any:
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)
        return cls(root, format_checker=jsonschema.FormatChecker())
    except Exception:  # noqa: BLE001 - a schema jsonschema cannot load gets no validator
        return None


def _valid(validator: Any, value: Any, schema: Any) -> bool:
    # descend() validates against a subschema with the root's $ref resolution
    return next(iter(validator.descend(value, schema)), None) is None


def regexes_disjoint(ra: str, rb: str, max_pairs: int = 20_000, timeout_s: float = 2.0) -> bool:
    """True when no text matches both regexes (breadth-first over pairs of byte-DFA states;
    False when that exceeds ``max_pairs`` pairs: unknown counts as overlapping)."""
    from .byte_dfa import build_byte_dfa
    from .dfa_ops import has_placeholder
    from .errors import GrammarCompileError

    if has_placeholder(ra) or has_placeholder(rb):  # a spliced part the regex does not show: unknown
        return False
    try:
        da, db = build_byte_dfa(ra, timeout_s), build_byte_dfa(rb, timeout_s)
    except GrammarCompileError:
        return False
    start = (da.initial, db.initial)
    seen, todo = {start}, [start]
    while todo:
        sa, sb = todo.pop()
        if da.final[sa] and db.final[sb]:
            return False
        for byte in np.intersect1d(da.live_bytes(sa), db.live_bytes(sb)).tolist():  # bytes allowed in both
            nxt = (da.next(sa, byte), db.next(sb, byte))
            if nxt not in seen:
                if len(seen) % 256 == 0:
                    quick.check("oneOf proof")
                if len(seen) >= max_pairs:
                    return False
                seen.add(nxt)
                todo.append(nxt)
    return True


UNCOMPILED = object()  # a branch whose regex is not known (or came with refusals): compiled here on trial


def branches_disjoint(branches: list, ctx: Ctx, regexes: list | None = None) -> bool:
    """True when no JSON value can satisfy two branches (checked by simple sufficient rules).
    ``regexes``: the branches' regexes as the compile already produced them (None for a branch
    no value satisfies, `UNCOMPILED` where unknown), so the proofs run as a pass after it."""
    derefd = [deref(b, ctx) for b in branches]
    known = regexes if regexes is not None else [UNCOMPILED] * len(branches)
    sigs = [_signature(b, ctx) for b in derefd]
    for i in range(len(sigs)):
        for j in range(i + 1, len(sigs)):
            if sigs[i] is not None and sigs[j] is not None and _sig_disjoint(sigs[i], sigs[j]):
                continue
            if not _pair_disjoint(derefd[i], derefd[j], ctx, known[i], known[j]):
                return False
    return True


_STRING_KEYS = {"type", "pattern", "format", "minLength", "maxLength", "enum", "const"}


def _pair_disjoint(a: Any, b: Any, ctx: Ctx, ra: Any, rb: Any) -> bool:
    """A finite branch none of whose values the other admits, or two string branches whose
    regexes (``ra``, ``rb``: see `branches_disjoint`) share no text."""
    if finite_disjoint(a, b, ctx.root) or finite_disjoint(b, a, ctx.root):
        return True
    regexes = []
    for s, r in ((a, ra), (b, rb)):
        if not (isinstance(s, dict) and s.get("type") in ("string", ["string"])
                and set(s) - ANNOTATIONS <= _STRING_KEYS):
            return False
        if r is UNCOMPILED:
            scratch = ctx.scratch()
            r = scratch.node(s, "")
            if scratch.problems:
                return False
        if r is None:
            return True  # a branch without values overlaps nothing
        regexes.append(r)
    return regexes_disjoint(*regexes)


def _signature(schema: Any, ctx: Ctx) -> dict | None:
    if not isinstance(schema, dict):
        return None
    sig: dict = {}
    if "const" in schema or "enum" in schema:
        vals = [schema["const"]] if "const" in schema else schema["enum"]
        sig["values"] = {json.dumps(v, sort_keys=True) for v in vals}
    t = schema.get("type")
    if t is not None:
        ts = {t} if isinstance(t, str) else set(t)
        if "integer" in ts:
            ts.add("number")
        sig["types"] = ts
    props = schema.get("properties", {})
    req = set(schema.get("required", [])) if isinstance(schema.get("required"), list) else set()
    consts = {}
    for name in req:
        p = deref(props.get(name), ctx)
        if isinstance(p, dict) and ("const" in p or "enum" in p):
            consts[name] = {json.dumps(v, sort_keys=True) for v in ([p["const"]] if "const" in p else p["enum"])}
    sig["discriminators"] = consts
    sig["object_only"] = sig.get("types") == {"object"}
    return sig


def _sig_disjoint(a: dict, b: dict) -> bool:
    if "values" in a and "values" in b and not (a["values"] & b["values"]):
        return True
    if "types" in a and "types" in b and not (a["types"] & b["types"]):
        return True
    if a["object_only"] and b["object_only"]:
        for k in set(a["discriminators"]) & set(b["discriminators"]):
            if not (a["discriminators"][k] & b["discriminators"][k]):
                return True
    return False
