"""Unit conversion: length, mass, volume, time, speed, data sizes and temperature.

Units are read leniently ("km", "kilometers", "Kilometre"), except where case carries
meaning (data sizes: "Mb" megabit vs "MB" megabyte).
"""
from __future__ import annotations

import math

from agentrt.registry import ToolRegistry

__all__ = ["UnitError", "convert", "convert_units", "known_units"]


class UnitError(ValueError):
    """An unknown unit or a conversion between different kinds of quantity."""


# kind -> canonical symbol -> (factor to the kind's base unit, aliases)
_LINEAR: dict[str, dict[str, tuple[float, tuple[str, ...]]]] = {
    "length": {
        "m": (1.0, ("meter", "meters", "metre", "metres")),
        "km": (1e3, ("kilometer", "kilometers", "kilometre", "kilometres")),
        "cm": (1e-2, ("centimeter", "centimeters", "centimetre", "centimetres")),
        "mm": (1e-3, ("millimeter", "millimeters", "millimetre", "millimetres")),
        "um": (1e-6, ("µm", "micrometer", "micrometers", "micron", "microns")),
        "nm": (1e-9, ("nanometer", "nanometers")),
        "mi": (1609.344, ("mile", "miles")),
        "yd": (0.9144, ("yard", "yards")),
        "ft": (0.3048, ("foot", "feet")),
        "in": (0.0254, ("inch", "inches")),
        "nmi": (1852.0, ("nautical mile", "nautical miles")),
    },
    "mass": {
        "kg": (1.0, ("kilogram", "kilograms", "kilo", "kilos")),
        "g": (1e-3, ("gram", "grams")),
        "mg": (1e-6, ("milligram", "milligrams")),
        "t": (1e3, ("tonne", "tonnes", "metric ton", "metric tons")),
        "lb": (0.45359237, ("lbs", "pound", "pounds")),
        "oz": (0.028349523125, ("ounce", "ounces")),
        "st": (6.35029318, ("stone", "stones")),
    },
    "volume": {
        "l": (1e-3, ("liter", "liters", "litre", "litres")),
        "ml": (1e-6, ("milliliter", "milliliters", "millilitre", "millilitres")),
        "m3": (1.0, ("cubic meter", "cubic meters", "cubic metre", "cubic metres")),
        "cm3": (1e-6, ("cc", "cubic centimeter", "cubic centimeters")),
        "gal": (3.785411784e-3, ("gallon", "gallons", "us gallon", "us gallons")),
        "qt": (9.46352946e-4, ("quart", "quarts")),
        "pt": (4.73176473e-4, ("pint", "pints")),
        "cup": (2.365882365e-4, ("cups",)),
        "floz": (2.95735295625e-5, ("fl oz", "fluid ounce", "fluid ounces")),
        "tbsp": (1.478676478125e-5, ("tablespoon", "tablespoons")),
        "tsp": (4.92892159375e-6, ("teaspoon", "teaspoons")),
    },
    "time": {
        "s": (1.0, ("sec", "secs", "second", "seconds")),
        "ms": (1e-3, ("millisecond", "milliseconds")),
        "us": (1e-6, ("µs", "microsecond", "microseconds")),
        "ns": (1e-9, ("nanosecond", "nanoseconds")),
        "min": (60.0, ("mins", "minute", "minutes")),
        "h": (3600.0, ("hr", "hrs", "hour", "hours")),
        "d": (86400.0, ("day", "days")),
        "wk": (604800.0, ("week", "weeks")),
        "yr": (31557600.0, ("year", "years")),  # Julian year, 365.25 days
    },
    "speed": {
        "m/s": (1.0, ("mps", "meters per second", "metres per second")),
        "km/h": (1 / 3.6, ("kph", "kmh", "km/hr", "kilometers per hour", "kilometres per hour")),
        "mph": (0.44704, ("mi/h", "miles per hour")),
        "kn": (1852 / 3600, ("knot", "knots", "kt")),
        "ft/s": (0.3048, ("fps", "feet per second")),
    },
    "data": {
        "bit": (1.0, ("bits",)),
        "B": (8.0, ("byte", "bytes")),
        "kB": (8e3, ("KB", "kilobyte", "kilobytes")),
        "MB": (8e6, ("megabyte", "megabytes")),
        "GB": (8e9, ("gigabyte", "gigabytes")),
        "TB": (8e12, ("terabyte", "terabytes")),
        "KiB": (8 * 2.0**10, ("kibibyte", "kibibytes")),
        "MiB": (8 * 2.0**20, ("mebibyte", "mebibytes")),
        "GiB": (8 * 2.0**30, ("gibibyte", "gibibytes")),
        "TiB": (8 * 2.0**40, ("tebibyte", "tebibytes")),
        "kb": (1e3, ("kbit", "kilobit", "kilobits")),
        "Mb": (1e6, ("Mbit", "megabit", "megabits")),
        "Gb": (1e9, ("Gbit", "gigabit", "gigabits")),
    },
}

# Temperature is affine: (scale, offset) with kelvin = value * scale + offset.
_TEMPERATURE: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "C": (1.0, 273.15, ("°C", "celsius", "celcius", "degC", "centigrade")),
    "F": (5 / 9, 273.15 - 32 * 5 / 9, ("°F", "fahrenheit", "degF")),
    "K": (1.0, 0.0, ("kelvin", "kelvins")),
}

_CASE_SENSITIVE_KINDS = ("data",)


def _build_index() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    exact: dict[str, tuple[str, str]] = {}
    folded: dict[str, tuple[str, str]] = {}
    for kind, units in _LINEAR.items():
        for symbol, (_, aliases) in units.items():
            for name in (symbol, *aliases):
                exact[name] = (kind, symbol)
                if kind not in _CASE_SENSITIVE_KINDS:
                    folded[name.lower()] = (kind, symbol)
                elif name.lower() == name and len(name) > 3:  # "megabytes" is unambiguous
                    folded[name] = (kind, symbol)
    for symbol, (_, _, aliases) in _TEMPERATURE.items():
        for name in (symbol, *aliases):
            exact[name] = ("temperature", symbol)
            folded[name.lower()] = ("temperature", symbol)
    return exact, folded


_EXACT, _FOLDED = _build_index()


def known_units() -> dict[str, list[str]]:
    """The canonical unit symbols by kind of quantity."""
    out = {kind: list(units) for kind, units in _LINEAR.items()}
    out["temperature"] = list(_TEMPERATURE)
    return out


def _lookup(unit: str) -> tuple[str, str]:
    text = " ".join(unit.strip().split())
    found = _EXACT.get(text) or _FOLDED.get(text.lower())
    if found is None and text.lower().startswith("degrees "):
        found = _FOLDED.get(text.lower()[len("degrees "):])
    if found is None:
        listing = "; ".join(f"{kind}: {', '.join(units)}" for kind, units in known_units().items())
        raise UnitError(f"unknown unit {unit!r}. Known units - {listing}")
    return found


def convert(value: float, from_unit: str, to_unit: str) -> tuple[float, str, str]:
    """Convert ``value``; returns (converted value, from symbol, to symbol)."""
    if not math.isfinite(value):
        raise UnitError("value must be a finite number")
    kind_a, sym_a = _lookup(from_unit)
    kind_b, sym_b = _lookup(to_unit)
    if kind_a != kind_b:
        raise UnitError(f"cannot convert {kind_a} ({sym_a}) to {kind_b} ({sym_b})")
    if kind_a == "temperature":
        scale_a, offset_a, _ = _TEMPERATURE[sym_a]
        scale_b, offset_b, _ = _TEMPERATURE[sym_b]
        kelvin = value * scale_a + offset_a
        if kelvin < -1e-9:
            raise UnitError(f"{value} {sym_a} is below absolute zero")
        result = (kelvin - offset_b) / scale_b
    else:
        result = value * _LINEAR[kind_a][sym_a][0] / _LINEAR[kind_a][sym_b][0]
    return float(f"{result:.10g}"), sym_a, sym_b


_tools = ToolRegistry()


@_tools.tool
def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, float | str]:
    """Convert a quantity between units of length, mass, volume, time, speed, data size or temperature.

    Args:
        value: The number to convert.
        from_unit: Unit of the value, e.g. "km", "lb", "F", "GB", "mph".
        to_unit: Unit to convert to, e.g. "mi", "kg", "C", "MiB", "km/h".
    """
    result, sym_a, sym_b = convert(value, from_unit, to_unit)
    return {"value": result, "unit": sym_b, "from": f"{value:g} {sym_a}"}
