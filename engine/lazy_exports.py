"""A package's public names imported on first use (PEP 562 module ``__getattr__``)."""
from __future__ import annotations

import importlib
from typing import Any


def export(namespace: dict[str, Any], exports: dict[str, list[str]], name: str) -> Any:
    """The value of ``name`` from the module that ``exports`` (relative module -> names) lists it
    under, imported now and kept in the package's ``namespace``; AttributeError if not listed."""
    package = namespace["__name__"]
    for module, names in exports.items():
        if name in names:
            value = namespace[name] = getattr(importlib.import_module(module, package), name)
            return value
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
