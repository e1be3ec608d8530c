"""Clock tools: current time in IANA zones (with a pinned clock), date arithmetic,
differences, weekdays, zone conversion, and clear errors for bad zones."""
from __future__ import annotations

import datetime as dt

import pytest

from agentrt.registry import ToolRegistry
from agentrt.tools import clock
from agentrt.types import ToolCall

FIXED = dt.datetime(2024, 7, 1, 12, 30, 5, tzinfo=dt.timezone.utc)


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "_now", lambda: FIXED)


def test_current_time_utc(pinned: None) -> None:
    assert clock.current_time() == {
        "datetime": "2024-07-01T12:30:05+00:00", "date": "2024-07-01", "time": "12:30:05",
        "weekday": "Monday", "timezone": "UTC", "utc_offset": "+00:00",
    }


@pytest.mark.parametrize(
    ("zone", "date", "time", "offset"),
    [
        ("Europe/Paris", "2024-07-01", "14:30:05", "+02:00"),  # summer time
        ("America/New_York", "2024-07-01", "08:30:05", "-04:00"),
        ("Asia/Kolkata", "2024-07-01", "18:00:05", "+05:30"),
        ("Pacific/Kiritimati", "2024-07-02", "02:30:05", "+14:00"),  # already tomorrow
    ],
)
def test_current_time_in_zones(pinned: None, zone: str, date: str, time: str, offset: str) -> None:
    out = clock.current_time(zone)
    assert (out["date"], out["time"], out["utc_offset"], out["timezone"]) == (date, time, offset, zone)


def test_bare_city_names_one_zone(pinned: None) -> None:
    assert clock.current_time("Paris")["timezone"] == "Europe/Paris"
    assert clock.current_time("new york")["timezone"] == "America/New_York"
    assert clock.current_time(" tokyo ")["time"] == "21:30:05"
    assert clock.current_time("gmt")["timezone"] == "UTC"


def test_unknown_zone_suggests(pinned: None) -> None:
    with pytest.raises(ValueError, match=r"unknown time zone 'Europe/Pari'.*did you mean Europe/Paris"):
        clock.current_time("Europe/Pari")
    with pytest.raises(ValueError, match="use an IANA name"):
        clock.current_time("Mars/Olympus")
    with pytest.raises(ValueError, match="unknown time zone"):
        clock.current_time("../../etc/passwd")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"days": 1}, "2024-03-01"),  # leap year
        ({"days": -60}, "2023-12-31"),
        ({"weeks": 2}, "2024-03-14"),
        ({"months": 1}, "2024-03-29"),
        ({"years": 1}, "2025-02-28"),  # clamped
        ({"months": -14, "days": 3}, "2023-01-01"),
    ],
)
def test_add_to_date(kwargs: dict, expected: str) -> None:
    assert clock.add_to_date(dt.date(2024, 2, 29), **kwargs)["date"] == expected


def test_add_to_date_month_end_and_range() -> None:
    assert clock.add_to_date(dt.date(2024, 1, 31), months=1) == {"date": "2024-02-29", "weekday": "Thursday"}
    with pytest.raises(ValueError, match="out of range"):
        clock.add_to_date(dt.date(9999, 12, 1), months=1)
    with pytest.raises(ValueError, match="out of range"):
        clock.add_to_date(dt.date(9999, 12, 1), days=100)


def test_date_difference() -> None:
    assert clock.date_difference(dt.date(2024, 1, 15), dt.date(2025, 3, 14)) == {
        "days": 424, "weeks": 60, "months": 13, "years": 1}
    assert clock.date_difference(dt.date(2025, 3, 14), dt.date(2024, 1, 15))["days"] == -424
    # whole months as add_to_date counts them: Jan 31 + 1 month = Feb 29
    assert clock.date_difference(dt.date(2024, 1, 31), dt.date(2024, 2, 29))["months"] == 1
    assert clock.date_difference(dt.date(2024, 1, 31), dt.date(2024, 2, 28))["months"] == 0
    assert clock.date_difference(dt.date(2024, 2, 29), dt.date(2024, 2, 29))["days"] == 0


def test_weekday_and_convert_time() -> None:
    assert clock.weekday(dt.date(2000, 1, 1)) == "Saturday"
    out = clock.convert_time("2024-01-15T09:00", to_timezone="Asia/Tokyo", from_timezone="Europe/London")
    assert (out["date"], out["time"], out["utc_offset"]) == ("2024-01-15", "18:00:00", "+09:00")
    out = clock.convert_time("2024-07-01T09:00:30", "America/Los_Angeles", "Asia/Tokyo")
    assert (out["date"], out["time"], out["utc_offset"]) == ("2024-06-30", "17:00:30", "-07:00")
    with pytest.raises(ValueError, match="invalid date or time '2024-02-30T10:00'"):
        clock.convert_time("2024-02-30T10:00", "UTC")


async def test_as_tools_with_string_dates() -> None:
    reg = ToolRegistry([clock.add_to_date, clock.weekday, clock.convert_time, clock.current_time])
    res = await reg.call(ToolCall(id="1", name="add_to_date", arguments={"date": "2024-12-25", "days": 10}))
    assert res.content == '{"date":"2025-01-04","weekday":"Saturday"}'
    res = await reg.call(ToolCall(id="2", name="weekday", arguments={"date": "2024-02-30"}))
    assert res.is_error and res.content.startswith("ValidationError") and "date" in res.content
    res = await reg.call(ToolCall(id="3", name="convert_time",
                                  arguments={"time": "2024-06-01T12:00:00", "to_timezone": "Europe/Berlin"}))
    assert not res.is_error and '"time":"14:00:00"' in res.content
    res = await reg.call(ToolCall(id="5", name="convert_time",
                                  arguments={"time": "2024-06-01T12:00:00+02:00", "to_timezone": "UTC"}))
    assert res.is_error and "time:" in res.content  # offsets are not accepted: from_timezone says the zone
    res = await reg.call(ToolCall(id="4", name="current_time", arguments={"timezone": "Nowhere/City"}))
    assert res.is_error and res.content.startswith("ValueError: unknown time zone 'Nowhere/City'")
    assert reg.get("weekday").spec.parameters["properties"]["date"]["format"] == "date"
