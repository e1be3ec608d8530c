"""Function signatures -> JSON Schemas: snapshots of many signatures, grammar-friendliness
(every schema compiles with outlines-core into a regex that accepts compact valid arguments),
docstring styles, and the argument round trip into the Python call.

Regenerate the snapshots after an intended change with
``AGENTRT_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/test_registry_schema.py``
and review the diff of tests/snapshots/registry/.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import pathlib
import re
import uuid
from typing import Annotated, Any, Callable, Literal, Optional

import pytest
from pydantic import BaseModel, Field
from typing_extensions import NotRequired, TypedDict

from agentrt.prompting import compact_json
from agentrt.registry import RunContext, Tool, ToolDefinitionError, ToolRegistry
from agentrt.schema import clean_json_schema
from agentrt.types import ToolCall
from tests.helpers.registry import assert_matches_snapshot, grammar_regex

# -- the signatures -------------------------------------------------------------------------

class Unit(str, enum.Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Priority(enum.IntEnum):
    low = 1
    high = 2


class Address(BaseModel):
    """A postal address."""

    street: str = Field(description="street and number")
    city: str
    zip: Optional[str] = None


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    addresses: list[Address] = []


@dataclasses.dataclass
class Window:
    start: dt.date
    days: int = 7


class Filter(TypedDict):
    field: str
    value: str | int
    op: NotRequired[Literal["eq", "ne", "gt", "lt"]]


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = 9


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool = True


def discriminated(pet: Annotated[Cat | Dog, Field(discriminator="kind")], friend: Cat | Dog | None = None) -> str:
    """Unions of models, tagged (pydantic's discriminator) and plain."""
    return f"{type(pet).__name__}|{type(friend).__name__}"


def scalars(text: str, count: int, ratio: float, flag: bool, label: str = "x", limit: int = 10) -> str:
    """Scalars of every JSON type, some with defaults."""
    return f"{text}|{count}|{ratio}|{flag}|{label}|{limit}"


def optionals(a: Optional[int], b: int | None = None, c: Optional[str] = "dflt") -> str:
    """Optional values are anyOf [X, null]."""
    return f"{a}|{b}|{c}"


def choices(unit: Unit, mode: Literal["fast", "slow"] = "fast", priority: Priority = Priority.low,
            one: Literal["only"] = "only") -> str:
    """Enums and literals."""
    return f"{unit.value}|{mode}|{priority.value}|{one}"


def containers(ids: list[int], weights: dict[str, float], pair: tuple[int, str],
               tags: set[str] = set(), matrix: list[list[float]] | None = None) -> str:
    """Lists, dicts, tuples and sets."""
    return f"{sorted(ids)}|{sorted(weights)}|{pair}|{sorted(tags)}|{matrix}"


def nested_models(person: Person, backup: Address | None = None) -> str:
    """Pydantic models, nested, inlined (no $defs)."""
    assert isinstance(person, Person)
    return f"{person.name}|{len(person.addresses)}|{backup.city if backup else None}"


def dataclass_and_typeddict(window: Window, filters: list[Filter]) -> str:
    """A dataclass and a TypedDict with a NotRequired key."""
    assert isinstance(window, Window) and isinstance(window.start, dt.date)
    return f"{window.start.isoformat()}|{window.days}|{[f['field'] for f in filters]}"


def constrained(
    n: Annotated[int, Field(ge=1, le=100, description="how many")],
    code: Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO currency")],
    name: Annotated[str, Field(min_length=1, max_length=20)],
    score: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5,
    items: Annotated[list[str], Field(min_length=1, max_length=3)] = ["a"],
) -> str:
    """Numeric bounds, patterns and lengths.

    Args:
        n: overridden by the Field description.
        name: a short name.
    """
    return f"{n}|{code}|{name}|{score}|{items}"


def dates(day: dt.date, at: dt.datetime, anything: Any = None) -> str:
    """Dates travel as formatted strings; Any is unconstrained."""
    return f"{day.isoformat()}|{at.isoformat()}|{anything}"


def with_context(city: str, ctx: RunContext[dict], days: int = 1) -> str:
    """The run context sits between parameters and is injected."""
    return f"{city}|{days}|{ctx.deps}"


def reserved_names(json: str, copy: bool = False, schema: int = 0) -> str:
    """Parameters shadowing BaseModel attributes keep their names in the schema."""
    return f"{json}|{copy}|{schema}"


def no_params() -> str:
    """Takes nothing."""
    return "ok"


def google_style(city: str, days: int = 3) -> str:
    """Forecast the weather.

    Uses the nearest station.

    Args:
        city: The city name, e.g. "Paris".
        days (int): How many days ahead.

    Returns:
        A short forecast.
    """
    return f"{city}|{days}"


def numpy_style(city: str, days: int = 3) -> str:
    """Forecast the weather.

    Parameters
    ----------
    city : str
        The city name.
    days : int, optional
        How many days ahead.

    Returns
    -------
    str
        A short forecast.
    """
    return f"{city}|{days}"


def sphinx_style(city: str, days: int = 3) -> str:
    """Forecast the weather.

    :param city: The city name.
    :param days: How many days ahead.
    :returns: A short forecast.
    """
    return f"{city}|{days}"


async def async_tool(query: str, top_k: int = 3) -> list[str]:
    """An async tool has the same schema as a sync one."""
    return [query] * top_k


# name -> (function, valid compact arguments, expected serialized result)
CASES: dict[str, tuple[Callable[..., Any], dict[str, Any], str]] = {
    "scalars": (scalars, {"text": "hi", "count": 2, "ratio": 0.5, "flag": True}, "hi|2|0.5|True|x|10"),
    "optionals": (optionals, {"a": None, "b": 3}, "None|3|dflt"),
    "choices": (choices, {"unit": "celsius", "priority": 2}, "celsius|fast|2|only"),
    "containers": (containers, {"ids": [3, 1], "weights": {"b": 1.0, "a": 2.5}, "pair": [1, "x"], "tags": ["z"]},
                   "[1, 3]|['a', 'b']|(1, 'x')|['z']|None"),
    "nested_models": (nested_models, {"person": {"name": "Ada", "age": 36, "addresses": [
        {"street": "1 Main", "city": "Oslo"}]}, "backup": {"street": "2 Side", "city": "Rome", "zip": "00100"}},
                      "Ada|1|Rome"),
    "dataclass_and_typeddict": (dataclass_and_typeddict, {"window": {"start": "2024-02-29"}, "filters": [
        {"field": "age", "value": 3, "op": "gt"}, {"field": "name", "value": "x"}]}, "2024-02-29|7|['age', 'name']"),
    "constrained": (constrained, {"n": 5, "code": "EUR", "name": "bob"}, "5|EUR|bob|0.5|['a']"),
    "dates": (dates, {"day": "2025-01-31", "at": "2025-01-31T10:20:30Z", "anything": {"k": [1]}},
              "2025-01-31|2025-01-31T10:20:30+00:00|{'k': [1]}"),
    "with_context": (with_context, {"city": "Oslo"}, "Oslo|1|None"),
    "reserved_names": (reserved_names, {"json": "j", "copy": True, "schema": 4}, "j|True|4"),
    "no_params": (no_params, {}, "ok"),
    "google_style": (google_style, {"city": "Paris"}, "Paris|3"),
    "numpy_style": (numpy_style, {"city": "Paris", "days": 1}, "Paris|1"),
    "sphinx_style": (sphinx_style, {"city": "Paris"}, "Paris|3"),
    "async_tool": (async_tool, {"query": "q", "top_k": 2}, '["q","q"]'),
    "discriminated": (discriminated, {"pet": {"kind": "dog"}, "friend": {"kind": "cat", "lives": 3}}, "Dog|Cat"),
}


@pytest.fixture(scope="module")
def tools() -> dict[str, Tool]:
    return {name: Tool.from_function(fn) for name, (fn, _, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_schema_snapshot(name: str, tools: dict[str, Tool]) -> None:
    t = tools[name]
    assert_matches_snapshot(f"{name}.json", {"name": t.name, "description": t.description,
                                              "parameters": t.json_schema})


@pytest.mark.parametrize("name", list(CASES))
def test_schema_is_grammar_friendly(name: str, tools: dict[str, Tool]) -> None:
    schema = tools[name].json_schema
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text and '"title"' not in text
    assert "uniqueItems" not in text  # a regex grammar cannot enforce it; sets dedupe on validation
    assert "discriminator" not in text and "oneOf" not in text

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # outlines-core (the grammar backend) compiles it, and the compact valid arguments match
    _, valid, _ = CASES[name]
    regex = grammar_regex(schema)
    assert re.fullmatch(regex, compact_json(valid)), (regex, compact_json(valid))


@pytest.mark.parametrize("name", list(CASES))
def test_schema_compiles_strictly_with_agentrt_grammar(name: str, tools: dict[str, Tool]) -> None:
    from agentrt.engine.grammar import schema_to_regex

    regex, unenforced = schema_to_regex(tools[name].json_schema)  # raises UnsupportedSchemaError
    assert regex and unenforced == []


@pytest.mark.parametrize("name", list(CASES))
async def test_valid_arguments_round_trip_into_the_call(name: str, tools: dict[str, Tool]) -> None:
    _, valid, expected = CASES[name]
    reg = ToolRegistry([tools[name]])
    res = await reg.call(ToolCall(id="c1", name=name, arguments=valid))
    assert (res.is_error, res.content) == (False, expected)


def test_parameter_order_is_kept(tools: dict[str, Tool]) -> None:
    assert list(tools["scalars"].json_schema["properties"]) == ["text", "count", "ratio", "flag", "label", "limit"]
    assert tools["scalars"].json_schema["required"] == ["text", "count", "ratio", "flag"]
    assert list(tools["with_context"].json_schema["properties"]) == ["city", "days"]


@pytest.mark.parametrize("name", ["google_style", "numpy_style", "sphinx_style"])
def test_docstring_styles(name: str, tools: dict[str, Tool]) -> None:
    t = tools[name]
    assert t.description.startswith("Forecast the weather.")
    assert "Returns" not in t.description and "Args" not in t.description and ":param" not in t.description
    props = t.json_schema["properties"]
    assert props["city"]["description"].startswith("The city name")
    assert props["days"]["description"] == "How many days ahead."


def test_field_description_wins_over_docstring(tools: dict[str, Tool]) -> None:
    props = tools["constrained"].json_schema["properties"]
    assert props["n"] == {"type": "integer", "description": "how many", "maximum": 100, "minimum": 1}
    assert props["name"]["description"] == "a short name."


def test_invalid_arguments_rejected_by_regex_and_validation(tools: dict[str, Tool]) -> None:
    t = tools["constrained"]
    regex = grammar_regex(t.json_schema)
    for bad in ({"n": 5, "code": "eur", "name": "bob"}, {"n": 5, "code": "EUR", "name": "bob", "x": 1},
                {"code": "EUR", "name": "bob"}):
        assert not re.fullmatch(regex, compact_json(bad)), bad
    with pytest.raises(ValueError, match="code"):
        t.parse_arguments({"n": 5, "code": "eur", "name": "bob"})
    with pytest.raises(ValueError, match="n: 500 is greater than the maximum of 100"):
        t.parse_arguments({"n": 500, "code": "EUR", "name": "bob"})


class Node(BaseModel):
    value: int
    children: list["Node"] = []


def test_recursive_types_are_refused_clearly() -> None:
    def tree(root: Node) -> int:
        """Sum a tree."""
        return root.value

    with pytest.raises(ToolDefinitionError, match="recursive type 'Node' cannot be inlined"):
        Tool.from_function(tree)


def test_local_types_with_future_annotations() -> None:
    class Local(BaseModel):
        q: str

    def search(item: Local, n: "int" = 1) -> str:
        """Search."""
        return item.q

    t = Tool.from_function(search)
    assert t.json_schema["properties"]["item"]["properties"] == {"q": {"type": "string"}}


def test_clean_keeps_properties_named_like_keywords() -> None:
    raw = {
        "type": "object",
        "title": "X",
        "properties": {"title": {"type": "string", "title": "Title"}, "default": {"type": "integer"}},
        "$defs": {},
    }
    assert clean_json_schema(raw) == {
        "type": "object",
        "properties": {"title": {"type": "string"}, "default": {"type": "integer"}},
        "additionalProperties": False,
    }


def test_typing_typeddict_is_an_actionable_error() -> None:
    import typing

    class Old(typing.TypedDict):
        a: int

    def f(x: Old) -> None:
        """F."""

    with pytest.raises(ToolDefinitionError, match="parameter 'x': unsupported type Old.*typing_extensions"):
        Tool.from_function(f)


async def test_set_parameters_dedupe_instead_of_refusing(tools: dict[str, Tool]) -> None:
    reg = ToolRegistry([tools["containers"]])
    res = await reg.call(ToolCall(id="c", name="containers", arguments={
        "ids": [1], "weights": {}, "pair": [0, ""], "tags": ["b", "a", "b"]}))
    assert (res.is_error, res.content) == (False, "[1]|[]|(0, '')|['a', 'b']|None")


def test_numpy_params_documented_together() -> None:
    def span(x: float, y: float) -> float:
        """Distance from the origin.

        Parameters
        ----------
        x, y : float
            Coordinates in metres.
        """
        return (x * x + y * y) ** 0.5

    props = Tool.from_function(span).json_schema["properties"]
    assert props["x"]["description"] == props["y"]["description"] == "Coordinates in metres."


def test_partial_keeps_the_wrapped_docstring() -> None:
    import functools

    def power(base: float, exponent: int) -> float:
        """Raise base to a power.

        Args:
            base: The base.
            exponent: The power.
        """
        return base**exponent

    t = Tool.from_function(functools.partial(power, 2.0), name="two_to")
    assert t.description == "Raise base to a power."
    assert t.json_schema["properties"] == {"exponent": {"type": "integer", "description": "The power."}}


def test_local_types_resolve_through_the_planner() -> None:
    from agentrt.planner import Agent
    from agentrt.testing import ScriptedLLM

    class Query(BaseModel):
        text: str

    def lookup(q: Query) -> str:
        """Look it up."""
        return q.text

    agent = Agent(ScriptedLLM([]), [lookup])
    assert agent.registry.get("lookup").json_schema["properties"]["q"]["required"] == ["text"]


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (pathlib.Path, {"type": "string"}),
        (bytes, {"type": "string"}),
        (dt.timedelta, {"type": "string"}),
        (uuid.UUID, {"type": "string", "format": "uuid"}),
        (dt.time, {"type": "string", "format": "time"}),
    ],
)
def test_only_enforceable_formats_are_kept(annotation: Any, expected: dict) -> None:
    def f(x) -> None:  # type: ignore[no-untyped-def]
        """F."""

    f.__annotations__ = {"x": annotation}
    schema = Tool.from_function(f).json_schema
    assert schema["properties"]["x"] == expected
    grammar_regex(schema)  # compiles
