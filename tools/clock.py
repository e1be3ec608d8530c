"""Date and time tools: the current time in any IANA time zone, date arithmetic,
differences between dates, weekdays, and converting a time between zones.

Dates travel as ISO strings (``YYYY-MM-DD``): the schemas say ``format: date``, so the
grammar only lets the model write real dates.
"""
from __future__ import annotations

import calendar
import datetime as dt
import zoneinfo
from typing import Annotated

from pydantic import Field

from agentrt.registry import ToolRegistry

__all__ = ["add_to_date", "convert_time", "current_time", "date_difference", "get_zone", "resolve_zone", "weekday"]


def _now() -> dt.datetime:
    """The current UTC time (one place for tests to pin the clock)."""
    return dt.datetime.now(dt.timezone.utc)


def resolve_zone(name: str) -> tuple[dt.tzinfo, str]:
    """The time zone ``name`` and its IANA name; ValueError naming the fix.

    Besides IANA names ("Europe/Paris") a bare city that names exactly one zone
    ("Tokyo", "new york") is accepted, as small models often write it that way.
    """
    key = name.strip()
    if key.upper() in ("UTC", "Z", "GMT"):
        return dt.timezone.utc, "UTC"
    try:
        return zoneinfo.ZoneInfo(key), key
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        pass
    lowered = "_".join(key.lower().split())
    zones = zoneinfo.available_timezones()
    by_city = sorted(z for z in zones if z.lower().rsplit("/", 1)[-1] == lowered and "/" in z)
    if len(by_city) == 1:
        return zoneinfo.ZoneInfo(by_city[0]), by_city[0]
    matches = by_city or sorted(z for z in zones if lowered and lowered in z.lower())
    hint = f"; did you mean {', '.join(matches[:5])}?" if matches else ""
    raise ValueError(f"unknown time zone {name!r}: use an IANA name like 'Europe/Paris' or 'UTC'{hint}")


def get_zone(name: str) -> dt.tzinfo:
    """The time zone called ``name`` (see :func:`resolve_zone`)."""
    return resolve_zone(name)[0]


def _describe(moment: dt.datetime, zone_name: str) -> dict[str, str]:
    offset = moment.strftime("%z")
    return {
        "datetime": moment.isoformat(timespec="seconds"),
        "date": moment.date().isoformat(),
        "time": moment.strftime("%H:%M:%S"),
        "weekday": moment.strftime("%A"),
        "timezone": zone_name,
        "utc_offset": f"{offset[:3]}:{offset[3:]}" if offset else "+00:00",
    }


_tools = ToolRegistry()


@_tools.tool
def current_time(timezone: str = "UTC") -> dict[str, str]:
    """Get the current date, time and weekday in a time zone.

    Args:
        timezone: IANA time zone name, e.g. "UTC", "Europe/Paris", "America/New_York".
    """
    zone, zone_name = resolve_zone(timezone)
    return _describe(_now().astimezone(zone), zone_name)


def _add_months(day: dt.date, months: int) -> dt.date:
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    if not 1 <= year <= 9999:
        raise ValueError("resulting date is out of range (years 1-9999)")
    last = calendar.monthrange(year, month + 1)[1]
    return dt.date(year, month + 1, min(day.day, last))  # Jan 31 + 1 month = Feb 28/29


@_tools.tool
def add_to_date(date: dt.date, days: int = 0, weeks: int = 0, months: int = 0, years: int = 0) -> dict[str, str]:
    """Add (or subtract, with negative numbers) days, weeks, months or years to a date.

    Args:
        date: Start date, YYYY-MM-DD.
        days: Days to add.
        weeks: Weeks to add.
        months: Months to add (the day is clamped to the month's end).
        years: Years to add.
    """
    try:
        result = _add_months(date, months + 12 * years) + dt.timedelta(days=days, weeks=weeks)
    except OverflowError:
        raise ValueError("resulting date is out of range (years 1-9999)") from None
    return {"date": result.isoformat(), "weekday": result.strftime("%A")}


@_tools.tool
def date_difference(start: dt.date, end: dt.date) -> dict[str, int]:
    """Count the days (and whole weeks, months, years) from start to end.

    Args:
        start: First date, YYYY-MM-DD.
        end: Second date, YYYY-MM-DD.
    """
    sign = 1 if end >= start else -1
    lo, hi = (start, end) if sign == 1 else (end, start)
    months = (hi.year - lo.year) * 12 + hi.month - lo.month
    if _add_months(lo, months) > hi:
        months -= 1
    days = (hi - lo).days
    return {"days": sign * days, "weeks": sign * (days // 7), "months": sign * months, "years": sign * (months // 12)}


@_tools.tool
def weekday(date: dt.date) -> str:
    """Tell the day of the week of a date.

    Args:
        date: The date, YYYY-MM-DD.
    """
    return date.strftime("%A")


# A local wall-clock time without an offset: the zone is from_timezone. (JSON Schema's
# "date-time" format requires an offset, which would make from_timezone meaningless.)
LocalDateTime = Annotated[str, Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?$")]


@_tools.tool
def convert_time(time: LocalDateTime, to_timezone: str, from_timezone: str = "UTC") -> dict[str, str]:
    """Convert a date and time from one time zone to another.

    Args:
        time: Local date and time in from_timezone, e.g. "2025-03-01T15:30".
        to_timezone: IANA time zone to convert to.
        from_timezone: IANA time zone the time is in.
    """
    try:
        local = dt.datetime.fromisoformat(time)
    except ValueError as exc:
        raise ValueError(f"invalid date or time {time!r}: {exc}") from None
    source = get_zone(from_timezone)
    target, target_name = resolve_zone(to_timezone)
    return _describe(local.replace(tzinfo=source).astimezone(target), target_name)
