"""``multipleOf`` with decimal steps: the grammar admits exactly the numbers whose value (as written) is a
multiple of the step, within the bounds; the registry's argument check agrees with it."""
from __future__ import annotations

import itertools
import random
from decimal import Decimal

import pytest

from agentrt.engine.grammar import ByteAutomaton, UnsupportedSchemaError, schema_to_regex
from agentrt.registry import ArgumentValidator


def _numbers(seed: int = 0) -> list[str]:
    """Number texts without exponent: every fraction of up to 2 digits on small integer parts, and
    random longer fractions (with trailing zeros, which do not change the value)."""
    rng = random.Random(seed)
    out = set()
    for ip in [*range(13), 99, 100, 101]:
        fracs = ["", *("".join(p) for n in (1, 2) for p in itertools.product("0123456789", repeat=n))]
        fracs += ["".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5))) for _ in range(40)]
        fracs += ["250", "500", "0000", "0100", "1250"]
        for f in fracs:
            text = str(ip) + (f".{f}" if f else "")
            out |= {text, "-" + text}
    return sorted(t for t in out if not (t.startswith("-") and Decimal(t) == 0))


NUMBERS = _numbers()


def _holds(text: str, schema: dict) -> bool:
    x, step = Decimal(text), Decimal(repr(schema["multipleOf"]))
    bounds = [("minimum", x.__ge__), ("exclusiveMinimum", x.__gt__), ("maximum", x.__le__), ("exclusiveMaximum", x.__lt__)]
    return x % step == 0 and all(test(Decimal(repr(schema[k]))) for k, test in bounds if k in schema)


@pytest.mark.parametrize("schema", [
    {"multipleOf": 0.01},
    {"multipleOf": 0.01, "minimum": 0},
    {"multipleOf": 0.5, "minimum": 0, "maximum": 10},
    {"multipleOf": 0.25, "exclusiveMinimum": -3.5, "exclusiveMaximum": 7.75},
    {"multipleOf": 0.01, "minimum": 0.015, "maximum": 12.335},
    {"multipleOf": 0.05, "exclusiveMinimum": 1.5, "maximum": 1.75},
    {"multipleOf": 0.125, "exclusiveMinimum": 0},
    {"multipleOf": 0.1, "minimum": -1, "exclusiveMaximum": 1},
    {"multipleOf": 0.0001, "minimum": 0, "maximum": 1},
    # steps the fraction alone does not decide: listed value by value within bounds
    {"multipleOf": 2.5, "minimum": 0, "maximum": 100},
    {"multipleOf": 0.3, "minimum": -2, "maximum": 3},
])
def test_decimal_steps_admit_exactly_their_multiples(schema):
    schema = {"type": "number", **schema}
    regex, _ = schema_to_regex(schema)
    a = ByteAutomaton(regex, timeout_s=None)
    wrong = [(t, _holds(t, schema)) for t in NUMBERS if a.fullmatch(t) != _holds(t, schema)]
    assert wrong == [], f"{schema}: (text, should admit) {wrong[:5]}"
    assert any(_holds(t, schema) for t in NUMBERS)


def test_the_registry_checks_steps_on_exact_decimals_like_the_grammar():
    schema = {"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.01, "minimum": 0}}}
    a = ByteAutomaton(schema_to_regex(schema)[0], timeout_s=None)
    check = ArgumentValidator(schema)
    for price in (19.99, 0.07, 10.99, 1230.55, 0.3, 5):  # a float division calls 19.99 / 0.01 no integer
        assert a.fullmatch(f'{{"price":{price}}}') and check.is_valid({"price": price}), price
    for price in (0.075, 12.345, -0.01):
        assert not a.fullmatch(f'{{"price":{price}}}') and not check.is_valid({"price": price}), price
    assert not check.is_valid({"price": float("inf")}) and not check.is_valid({"price": float("nan")})


def test_integers_with_a_decimal_step_and_steps_refused_by_name():
    regex, _ = schema_to_regex({"type": "integer", "multipleOf": 0.5})  # every integer
    a = ByteAutomaton(regex, timeout_s=None)
    assert all(a.fullmatch(t) for t in ("0", "7", "-3", "7.0")) and not a.fullmatch("1.5")
    regex, _ = schema_to_regex({"type": "integer", "multipleOf": 0.4, "minimum": 0})  # 0.4 k integer: k = 2
    a = ByteAutomaton(regex, timeout_s=None)
    assert a.fullmatch("2") and a.fullmatch("10") and not a.fullmatch("3")
    for schema in ({"type": "number", "multipleOf": 0.3}, {"type": "number", "multipleOf": 2.5, "minimum": 0}):
        with pytest.raises(UnsupportedSchemaError, match="multipleOf"):
            schema_to_regex(schema)


@pytest.mark.parametrize("steps, lcm", [((2, 3), 6), ((0.25, 0.1), 0.5), ((0.5, 1.5), 1.5), ((4, 0.5), 4)])
def test_all_of_two_steps_is_their_least_common_multiple(steps, lcm):
    schema = {"type": "number", "minimum": -30, "maximum": 30, "allOf": [{"multipleOf": s} for s in steps]}
    a = ByteAutomaton(schema_to_regex(schema)[0], timeout_s=None)
    wrong = [t for t in NUMBERS if Decimal(t).copy_abs() <= 30
             and a.fullmatch(t) != all(Decimal(t) % Decimal(repr(s)) == 0 for s in steps)]
    assert wrong == [], wrong[:5]
    assert a.fullmatch(str(lcm)) and a.fullmatch(f"-{lcm}")
