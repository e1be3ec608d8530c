"""Helpers for the registry tests: JSON snapshots and the grammar backend's regex."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SNAPSHOT_DIR = Path(__file__).parents[1] / "snapshots" / "registry"
UPDATE = os.environ.get("AGENTRT_UPDATE_SNAPSHOTS") == "1"


def assert_matches_snapshot(filename: str, value: Any) -> None:
    """Compare ``value`` with the stored snapshot (written when AGENTRT_UPDATE_SNAPSHOTS=1)."""
    path = SNAPSHOT_DIR / filename
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing snapshot {path}; run with AGENTRT_UPDATE_SNAPSHOTS=1 to create it"
    stored = json.loads(path.read_text())
    assert value == stored, f"{filename} differs from its snapshot:\n{text}"
    # key order is part of the contract (the grammar forces properties in schema order)
    assert json.dumps(value) == json.dumps(stored), f"{filename}: same content, different key order"


def grammar_regex(schema: dict[str, Any]) -> str:
    """The regex outlines-core builds for ``schema`` with no optional whitespace."""
    from outlines_core.json_schema import build_regex_from_schema

    return build_regex_from_schema(json.dumps(schema), "")

