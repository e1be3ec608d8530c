"""Unit conversion across every kind of quantity, lenient unit names, and refusals."""
from __future__ import annotations

import pytest

from agentrt.registry import ToolRegistry
from agentrt.tools.units import UnitError, convert, convert_units, known_units
from agentrt.types import ToolCall


@pytest.mark.parametrize(
    ("value", "src", "dst", "expected"),
    [
        (1, "km", "m", 1000),
        (1, "mi", "km", 1.609344),
        (12, "inches", "feet", 1),
        (3, "Feet", "cm", 91.44),
        (1, "nautical mile", "m", 1852),
        (1, "kg", "lb", 2.204622622),
        (16, "oz", "lb", 1),
        (1, "stone", "kg", 6.35029318),
        (1, "gal", "l", 3.785411784),
        (2, "cups", "ml", 473.176473),
        (3, "tsp", "tbsp", 1),
        (1, "m3", "L", 1000),
        (1, "h", "s", 3600),
        (1, "week", "days", 7),
        (90, "minutes", "hours", 1.5),
        (100, "km/h", "mph", 62.13711922),
        (10, "m/s", "km/h", 36),
        (1, "knot", "km/h", 1.852),
        (1, "GB", "MB", 1000),
        (1, "GiB", "MiB", 1024),
        (1, "MB", "Mb", 8),
        (100, "Mbit", "MB", 12.5),
        (1, "byte", "bits", 8),
        (100, "C", "F", 212),
        (32, "fahrenheit", "celsius", 0),
        (0, "K", "C", -273.15),
        (-40, "degrees celsius", "°F", -40),
        (300, "kelvin", "F", 80.33),
    ],
)
def test_converts(value: float, src: str, dst: str, expected: float) -> None:
    assert convert(value, src, dst)[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ("km", "kg", r"cannot convert length \(km\) to mass \(kg\)"),
        ("C", "m", "cannot convert temperature"),
        ("furlongs", "m", "unknown unit 'furlongs'. Known units - length: m, km"),
        ("mb", "MB", "unknown unit 'mb'"),  # megabit or megabyte? refuse to guess
    ],
)
def test_refuses(src: str, dst: str, message: str) -> None:
    with pytest.raises(UnitError, match=message):
        convert(1, src, dst)


def test_below_absolute_zero_and_non_finite() -> None:
    with pytest.raises(UnitError, match="below absolute zero"):
        convert(-300, "C", "K")
    with pytest.raises(UnitError, match="finite"):
        convert(float("inf"), "m", "km")


def test_known_units_lists_every_kind() -> None:
    assert set(known_units()) == {"length", "mass", "volume", "time", "speed", "data", "temperature"}


async def test_as_a_tool() -> None:
    reg = ToolRegistry([convert_units])
    res = await reg.call(ToolCall(id="1", name="convert_units",
                                  arguments={"value": 5, "from_unit": "miles", "to_unit": "km"}))
    assert (res.is_error, res.content) == (False, '{"value":8.04672,"unit":"km","from":"5 mi"}')
    res = await reg.call(ToolCall(id="2", name="convert_units",
                                  arguments={"value": 5, "from_unit": "lb", "to_unit": "km"}))
    assert res.is_error and res.content == "UnitError: cannot convert mass (lb) to length (km)"
