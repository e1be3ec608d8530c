"""Property-based fuzzing of the server's OpenAPI schema (schemathesis): no input makes a 5xx.

A fake model stands behind the app (the real one would make each example cost seconds):
it answers in the shape the turn's grammar allows, as the constrained engine would.
"""
from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from agentrt.server import create_app
from agentrt.testing import ScriptedLLM
from agentrt.types import Usage
from tests.test_server import make_registry


def grammar_shaped_reply(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> str:
    """What a grammar-constrained model could say under ``schema``."""
    if schema is None:
        return "ok"
    text = json.dumps(schema)
    if '"answer"' in text and '"calls"' not in json.dumps(schema.get("properties", {})):
        return '{"answer":"ok"}'
    if '"calls"' in text:
        shapes = schema.get("anyOf", [schema])
        for shape in shapes:
            if "calls" in shape.get("properties", {}):
                tool = shape["properties"]["calls"]["items"]
                name = tool.get("properties", {}).get("tool", {}).get("const")
                if name is None:  # several tools: anyOf of call shapes
                    name = tool["anyOf"][0]["properties"]["tool"]["const"]
                return json.dumps({"calls": [{"tool": name, "arguments": {}}]})
    return "{}"


# never runs out: each reply is what a grammar-constrained model could say under the turn's schema
fuzz_llm = ScriptedLLM([], fallback=grammar_shaped_reply, chunk_chars=1 << 20,
                       usage=Usage(prompt_tokens=5, completion_tokens=3), model_name="fuzz")
app = create_app(llm=fuzz_llm, registry=make_registry(), max_body_bytes=64 * 1024)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=int(os.environ.get("AGENTRT_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_makes_a_server_error(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
