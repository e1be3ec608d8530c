"""A JSON/CSV query helper: filter rows by simple field conditions, pick fields,
count / sum / average / min / max.

The data is a file under the file tools' root (``.json``, ``.jsonl``, ``.csv``, ``.tsv``)
or inline text (JSON or CSV). String comparisons for ``eq``/``ne``/``contains`` ignore
case; numbers in CSV cells are read as numbers.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, Field

from agentrt.registry import Tool, ToolRegistry
from agentrt.tools.files import FileSandbox

__all__ = ["Condition", "data_tools", "load_records", "query_records"]

Scalar = str | int | float | bool | None
Op = Literal["eq", "ne", "gt", "ge", "lt", "le", "contains"]
Aggregate = Literal["rows", "count", "sum", "avg", "min", "max"]


class Condition(BaseModel):
    """Keep rows whose field compares true with the value."""

    field: str = Field(description='Field name; "a.b" for nested JSON.')
    op: Op = Field("eq", description="eq, ne, gt, ge, lt, le or contains.")
    value: Scalar = Field(description="Value to compare with.")


def _number(text: str) -> Scalar:
    """A CSV cell as a number when it is one, '' as None, else the text."""
    stripped = text.strip()
    if stripped == "":
        return None
    for kind in (int, float):
        try:
            return kind(stripped)
        except ValueError:
            pass
    return text


def _parse_csv(text: str, delimiter: str | None = None) -> list[dict[str, Any]]:
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:2048], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        raise ValueError("the CSV has no header row")
    return [{k.strip(): _number(v or "") for k, v in row.items() if k is not None} for row in reader]


def _parse_json(text: str, lines: bool = False) -> list[dict[str, Any]]:
    if lines:
        data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
    if isinstance(data, dict):
        # {"items": [...]}: query the one list of records inside
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ValueError("JSON data must be a list of objects (or an object holding one such list)")
    return data


def load_records(source: str, sandbox: FileSandbox | None = None) -> list[dict[str, Any]]:
    """Rows from inline JSON/CSV text or from a file under ``sandbox``'s root."""
    text = source.strip().lstrip("\ufeff")
    if not text:
        raise ValueError("source is empty: give a file path or JSON/CSV text")
    if text[0] in "[{":
        try:
            return _parse_json(text)
        except json.JSONDecodeError:
            return _parse_json(text, lines=True)
    if "\n" in text:
        return _parse_csv(text)
    if sandbox is None:
        raise ValueError("no folder is configured for data files; pass the data inline")
    real, content = sandbox.read_text(text)
    suffix = os.path.splitext(real.name)[1].lower()
    if suffix == ".json":
        return _parse_json(content)
    if suffix in (".jsonl", ".ndjson"):
        return _parse_json(content, lines=True)
    if suffix == ".tsv":
        return _parse_csv(content, "\t")
    return _parse_csv(content) if suffix == ".csv" or content.lstrip()[:1] not in "[{" else _parse_json(content)


_MISSING = object()


def _get(row: dict[str, Any], field: str) -> Any:
    value: Any = row
    for part in field.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return row.get(field, _MISSING) if "." in field else _MISSING
    return value


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _matches(row: dict[str, Any], cond: Condition) -> bool:
    actual = _get(row, cond.field)
    if actual is _MISSING:
        return cond.op == "ne"
    expected = cond.value
    if cond.op in ("eq", "ne"):
        a_num, e_num = _as_number(actual), _as_number(expected)
        if a_num is not None and e_num is not None:
            same = a_num == e_num
        elif isinstance(actual, str) and isinstance(expected, str):
            same = actual.strip().casefold() == expected.strip().casefold()
        else:
            same = actual == expected
        return same if cond.op == "eq" else not same
    if cond.op == "contains":
        if isinstance(actual, list):
            return any(str(x).casefold() == str(expected).casefold() for x in actual)
        return str(expected).casefold() in str(actual).casefold()
    a_num, e_num = _as_number(actual), _as_number(expected)
    left: Any
    right: Any
    if a_num is not None and e_num is not None:
        left, right = a_num, e_num
    elif actual is None or expected is None:
        return False
    else:
        left, right = str(actual), str(expected)  # ISO dates order correctly as text
    return {"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[cond.op]


def _check_fields(records: list[dict[str, Any]], names: list[str]) -> None:
    known: list[str] = []
    for row in records:
        for key in row:
            if key not in known:
                known.append(key)
    for name in names:
        if not any(_get(row, name) is not _MISSING for row in records):
            raise ValueError(f"unknown field {name!r}; fields: {', '.join(known) or '(none)'}")


def query_records(records: list[dict[str, Any]], where: list[Condition] | None = None,
                  select: list[str] | None = None, aggregate: Aggregate = "rows",
                  field: str | None = None, limit: int = 20) -> dict[str, Any]:
    """Filter ``records`` by every condition in ``where`` and summarize them."""
    where = where or []
    select = select or []
    if aggregate in ("sum", "avg", "min", "max") and not field:
        raise ValueError(f"aggregate {aggregate!r} needs the field to compute it over")
    if records:
        _check_fields(records, [c.field for c in where] + select + ([field] if field else []))
    rows = [r for r in records if all(_matches(r, c) for c in where)]
    if aggregate == "count":
        return {"count": len(rows)}
    if aggregate == "rows":
        shown = [{name: _none(_get(r, name)) for name in select} if select else r for r in rows[: max(limit, 0)]]
        out: dict[str, Any] = {"matched": len(rows), "rows": shown}
        if len(rows) > len(shown):
            out["note"] = f"showing {len(shown)} of {len(rows)} rows"
        return out
    assert field is not None
    values = [_as_number(_get(r, field)) for r in rows]
    numbers = [v for v in values if v is not None]
    if not numbers:
        raise ValueError(f"no numeric values of {field!r} in the {len(rows)} matching rows")
    result = {"sum": sum(numbers), "avg": sum(numbers) / len(numbers), "min": min(numbers),
              "max": max(numbers)}[aggregate]
    if isinstance(result, float):
        result = float(f"{result:.12g}")
    return {aggregate: result, "field": field, "matched": len(rows), "numeric_values": len(numbers)}


def _none(value: Any) -> Any:
    return None if value is _MISSING else value


def data_tools(sandbox: FileSandbox | None = None) -> list[Tool]:
    """The ``query_data`` tool, reading files through ``sandbox`` (None: inline data only)."""
    reg = ToolRegistry()

    @reg.tool
    def query_data(source: str, where: list[Condition] = [], select: list[str] = [],
                   aggregate: Aggregate = "rows", field: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Query a JSON or CSV table: filter rows, pick fields, or count/sum/avg/min/max a field.

        Args:
            source: A .json/.csv file path in the allowed folder, or the JSON/CSV text itself.
            where: Conditions every returned row must meet.
            select: Fields to return (all if empty).
            aggregate: "rows" to list rows, or count, sum, avg, min, max.
            field: The numeric field for sum, avg, min and max.
            limit: Most rows to return.
        """
        return query_records(load_records(source, sandbox), where, select, aggregate, field, limit)

    return list(reg)
