"""Built-in tools, each an ordinary ``@tool`` function.

- :mod:`~agentrt.tools.calculator`: ``calculate`` (AST-evaluated arithmetic, no ``eval``)
- :mod:`~agentrt.tools.clock`: ``current_time``, ``add_to_date``, ``date_difference``,
  ``weekday``, ``convert_time``
- :mod:`~agentrt.tools.units`: ``convert_units``
- :mod:`~agentrt.tools.files`: ``read_file``, ``list_files`` (read-only, confined to a root folder)
- :mod:`~agentrt.tools.data`: ``query_data`` (JSON/CSV filter, select, count/sum/avg/min/max)

``builtin_registry(root)`` gathers them with the file tools bound to ``root``;
``default_tools`` is the same list with the root taken from ``$AGENTRT_FILES_ROOT``
or the current directory at call time.
"""
from __future__ import annotations

import os

from agentrt.registry import Tool, ToolRegistry
from agentrt.tools.calculator import calculate
from agentrt.tools.clock import add_to_date, convert_time, current_time, date_difference, weekday
from agentrt.tools.data import data_tools
from agentrt.tools.files import FileSandbox, file_tools
from agentrt.tools.units import convert_units

__all__ = [
    "add_to_date",
    "builtin_registry",
    "builtin_tools",
    "calculate",
    "convert_time",
    "convert_units",
    "current_time",
    "date_difference",
    "default_tools",
    "weekday",
]

_PURE_TOOLS: list[Tool] = [calculate, current_time, add_to_date, date_difference, weekday, convert_time,
                           convert_units]


def builtin_tools(root: str | os.PathLike[str] | None = None) -> list[Tool]:
    """Every built-in tool; the file and data tools read only under ``root``."""
    sandbox = FileSandbox(root)
    return [*_PURE_TOOLS, *file_tools(root), *data_tools(sandbox)]


def builtin_registry(root: str | os.PathLike[str] | None = None) -> ToolRegistry:
    """A fresh registry of every built-in tool (file tools confined to ``root``;
    None = ``$AGENTRT_FILES_ROOT`` or the current directory at call time)."""
    return ToolRegistry(builtin_tools(root))


default_tools: list[Tool] = builtin_tools()
"""The built-in tools with the default root (usable as ``Agent(model, tools=default_tools)``)."""
