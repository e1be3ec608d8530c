"""Test doubles for the LangChain adapter tests: LLMs that fail, stall or get cut off."""
from __future__ import annotations

import asyncio
import re
from typing import Any

from agentrt.llm import ChatMessage, Completion
from agentrt.prompting import compact_json
from agentrt.testing import ScriptedLLM
from agentrt.types import Usage


def programmed(plan: list[Any], usage: Usage | None = None) -> ScriptedLLM:
    """A `ScriptedLLM` whose calls follow ``plan``: each entry is an Exception to raise, a
    ``("sleep", seconds)`` stall (then "late"), or a ``(text, finish_reason)`` result; streams
    send 3 characters a chunk."""
    usage = usage or Usage(prompt_tokens=11, completion_tokens=5, cached_tokens=7)

    def stall(seconds: float) -> Any:
        async def reply(messages: Any, schema: Any) -> str:
            await asyncio.sleep(seconds)
            return "late"
        return reply

    replies = [step if isinstance(step, BaseException)
               else stall(step[1]) if step[0] == "sleep"
               else Completion(text=step[0], finish_reason=step[1], usage=usage) for step in plan]
    return ScriptedLLM(replies, chunk_chars=3, usage=usage, model_name="programmable")


# ---------------------------------------------------------------- a scripted "oracle" model

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")


class _Hints:
    """Values taken from the last user message, the way a model would copy them."""

    def __init__(self, text: str):
        self.numbers = [float(n) for n in _NUMBER.findall(text)]
        self.strings = [a or b for a, b in _QUOTED.findall(text)]
        self.words = [w for w in re.findall(r"[A-Za-z]{4,}", text)]

    def number(self) -> float:
        return self.numbers.pop(0) if self.numbers else 1

    def string(self, key: str) -> str:
        if self.strings:
            return self.strings.pop(0)
        return f"{key} about {self.words[-1] if self.words else 'things'}"


def _instance(schema: Any, defs: dict[str, Any], hints: _Hints, key: str = "value") -> Any:
    """A value valid for ``schema`` (the subset our grammars use), filled from ``hints``."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        return _instance(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, hints, key)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for k in ("anyOf", "oneOf"):
        if k in schema:
            options = [s for s in schema[k] if s.get("type") != "null"] or schema[k]
            return _instance(options[0], defs, hints, key)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "null")
    if t == "object" or "properties" in schema:
        return {k: _instance(v, defs, hints, k) for k, v in (schema.get("properties") or {}).items()}
    if t == "array":
        return [_instance(schema.get("items", {}), defs, hints, key) for _ in range(max(1, schema.get("minItems", 1)))]
    if t == "string":
        return hints.string(key)
    if t == "integer":
        return int(hints.number())
    if t == "number":
        return hints.number()
    if t == "boolean":
        return True
    return None


def oracle_reply(messages: list[ChatMessage], json_schema: dict[str, Any] | None) -> str:
    """What a capable model would answer under the adapter's plan: free text, an object of
    the output schema, a call of the first allowed tool with arguments copied from the
    request, or, once tool results are in, an answer."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    hints = _Hints(last)
    if json_schema is None:
        return "Hello! I am a scripted model, glad to help."
    defs = json_schema.get("$defs", {})
    shapes = json_schema.get("anyOf", [json_schema])
    calls = next((s for s in shapes if "calls" in (s.get("properties") or {})), None)
    answer = next((s for s in shapes if "answer" in (s.get("properties") or {})), None)
    if calls is None and answer is None:  # schema mode: the object itself
        return compact_json(_instance(json_schema, defs, hints))
    has_results = last.startswith(("Result of", "Error from"))
    if answer is not None and (calls is None or has_results):
        return compact_json({"answer": "Done: " + last[:60]})
    items = calls["properties"]["calls"]["items"]
    first = items["anyOf"][0] if "anyOf" in items else items
    call = {"tool": first["properties"]["tool"]["const"],
            "arguments": _instance(first["properties"]["arguments"], defs, hints)}
    return compact_json({"calls": [call]})


class ChatAgentRTFeatures:
    """The feature flags of `ChatAgentRT`, shared by every langchain-tests suite class here
    (set truthfully: tool calling with tool_choice, structured output, JSON mode, usage)."""

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True
