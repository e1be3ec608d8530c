"""The JSON/CSV query helper: inline and file sources, filters, field picks, aggregates,
and clear errors for unknown fields and bad data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentrt.registry import ToolRegistry
from agentrt.tools.data import Condition, data_tools, load_records, query_records
from agentrt.tools.files import FileSandbox
from agentrt.types import ToolCall

CSV = "name,city,age,score\nAda,Oslo,36,9.5\nBob,Rome,25,7\nCy,oslo,41,\nDee,Paris,29,8.25\n"
PEOPLE = [
    {"name": "Ada", "city": "Oslo", "age": 36, "tags": ["math", "code"], "address": {"zip": "0150"}},
    {"name": "Bob", "city": "Rome", "age": 25, "tags": ["art"], "address": {"zip": "00100"}},
    {"name": "Cy", "city": "Oslo", "age": 41, "tags": [], "address": {"zip": "0151"}},
]


def c(field: str, value, op: str = "eq") -> Condition:
    return Condition(field=field, op=op, value=value)


def test_csv_inline_numbers_and_filters() -> None:
    rows = load_records(CSV)
    assert rows[0] == {"name": "Ada", "city": "Oslo", "age": 36, "score": 9.5}
    assert rows[2]["score"] is None
    out = query_records(rows, [c("city", "OSLO")], select=["name", "age"])
    assert out == {"matched": 2, "rows": [{"name": "Ada", "age": 36}, {"name": "Cy", "age": 41}]}
    assert query_records(rows, [c("age", 30, "gt")], aggregate="count") == {"count": 2}
    assert query_records(rows, [c("age", "29", "ge"), c("city", "Oslo", "ne")], select=["name"])["rows"] == [
        {"name": "Dee"}]
    assert query_records(rows, [c("name", "d", "contains")], aggregate="count") == {"count": 2}


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [("sum", 24.75), ("avg", 8.25), ("min", 7), ("max", 9.5)],
)
def test_aggregates_skip_empty_cells(aggregate: str, expected: float) -> None:
    out = query_records(load_records(CSV), aggregate=aggregate, field="score")
    assert out == {aggregate: expected, "field": "score", "matched": 4, "numeric_values": 3}


def test_json_inline_nested_and_lists() -> None:
    rows = load_records(json.dumps({"people": PEOPLE, "count": 3}))
    assert len(rows) == 3
    assert query_records(rows, [c("address.zip", "0150")], select=["name"])["rows"] == [{"name": "Ada"}]
    assert query_records(rows, [c("tags", "ART", "contains")], select=["name"])["rows"] == [{"name": "Bob"}]
    assert query_records(rows, aggregate="avg", field="age") == {"avg": 34, "field": "age", "matched": 3,
                                                                 "numeric_values": 3}
    jsonl = "\n".join(json.dumps(p) for p in PEOPLE)
    assert len(load_records(jsonl)) == 3


def test_limit_note() -> None:
    out = query_records(PEOPLE, select=["name"], limit=2)
    assert out == {"matched": 3, "rows": [{"name": "Ada"}, {"name": "Bob"}], "note": "showing 2 of 3 rows"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"where": [Condition(field="town", value="Oslo")]}, "unknown field 'town'; fields: name, city, age"),
        ({"select": ["nme"]}, "unknown field 'nme'"),
        ({"aggregate": "sum"}, "needs the field"),
        ({"aggregate": "sum", "field": "city"}, "no numeric values of 'city'"),
    ],
)
def test_query_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        query_records(PEOPLE, **kwargs)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "source is empty"),
        ("[1, 2]", "list of objects"),
        ("people.csv", "no folder is configured"),
    ],
)
def test_load_errors(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_records(source)


def test_files_under_the_root(tmp_path: Path) -> None:
    (tmp_path / "people.csv").write_text(CSV)
    (tmp_path / "people.json").write_text(json.dumps(PEOPLE))
    (tmp_path / "people.tsv").write_text(CSV.replace(",", "\t"))
    box = FileSandbox(tmp_path)
    assert len(load_records("people.csv", box)) == 4
    assert len(load_records("people.json", box)) == 3
    assert load_records("people.tsv", box)[1]["city"] == "Rome"
    (tmp_path / "excel.csv").write_bytes("\ufeffname,n\nA,1\n".encode())
    assert load_records("excel.csv", box) == [{"name": "A", "n": 1}]
    with pytest.raises(FileNotFoundError, match="no file 'nope.csv'"):
        load_records("nope.csv", box)
    with pytest.raises(PermissionError, match="not allowed"):
        load_records("../people.csv", box)


async def test_as_a_tool(tmp_path: Path) -> None:
    (tmp_path / "sales.csv").write_text("region,amount\nnorth,10\nsouth,5\nnorth,2.5\n")
    reg = ToolRegistry(data_tools(FileSandbox(tmp_path)))
    res = await reg.call(ToolCall(id="1", name="query_data", arguments={
        "source": "sales.csv", "where": [{"field": "region", "value": "north"}], "aggregate": "sum",
        "field": "amount"}))
    assert (res.is_error, res.content) == (False, '{"sum":12.5,"field":"amount","matched":2,"numeric_values":2}')
    res = await reg.call(ToolCall(id="2", name="query_data", arguments={
        "source": "sales.csv", "where": [{"field": "region", "op": "like", "value": "n"}]}))
    assert res.is_error and res.content.startswith("ValidationError") and "where.0.op" in res.content
    schema = reg.get("query_data").spec.parameters
    assert list(schema["properties"]) == ["source", "where", "select", "aggregate", "field", "limit"]
    assert schema["properties"]["where"]["items"]["properties"]["op"]["enum"][0] == "eq"
