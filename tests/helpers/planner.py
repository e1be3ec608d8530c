"""Tools and helpers for the planner's tests (importable as `tests.helpers.planner`)."""
from __future__ import annotations

from agentrt.registry import ToolRegistry

registry = ToolRegistry()


@registry.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@registry.tool
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


not_a_tool = 42
