"""Proofs that two ``oneOf`` branches share no value (then "exactly one" is plain alternation).

Two sufficient checks beyond the type / discriminator signatures of schema_regex:

- a branch with finitely many values (enum / const): none of its values is valid against the
  other branch, asked of the JSON Schema validator itself (exact, $refs resolved from the root);
- two string branches: the intersection of their regexes is empty. Each JSON string has one
  canonical encoding and string regexes admit exactly the canonical encodings of the valid
  strings, so no common text means no common value.
"""
from __future__ import annotations

from typing import Any

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
    from .automaton import ByteAutomaton
    from .errors import GrammarCompileError

    try:
        da, db = ByteAutomaton(ra, timeout_s=timeout_s).index, ByteAutomaton(rb, timeout_s=timeout_s).index
    except GrammarCompileError:
        return False
    start = (da.initial_state(), db.initial_state())
    seen, todo = {start}, [start]
    while todo:
        sa, sb = todo.pop()
        if da.is_final(sa) and db.is_final(sb):
            return False
        # [shape] bytes allowed in both states: intersection of two sorted id arrays
        for byte in set(da.allowed_ids(sa).tolist()) & set(db.allowed_ids(sb).tolist()):
            nxt = (da.next_state(sa, byte), db.next_state(sb, byte))
            if nxt not in seen:
                if len(seen) >= max_pairs:
                    return False
                seen.add(nxt)
                todo.append(nxt)
    return True
