"""How `RemoteLLM` asks an OpenAI-compatible server to constrain its output to a JSON Schema.

Servers disagree on the request field that carries the schema:

- ``json_schema``: ``response_format={"type": "json_schema", "json_schema": {...}}`` (OpenAI,
  vLLM, SGLang, llama.cpp's ``llama-server``, agentrt itself);
- ``json_object_schema``: ``response_format={"type": "json_object", "schema": {...}}``
  (llama-cpp-python's server, which answers ``json_schema`` with HTTP 500);
- ``tools``: the schema as the parameters of one function tool that ``tool_choice`` forces,
  for servers that constrain tool calls only; the answer is that call's arguments.

This module builds those request fields and judges a server's errors while `RemoteLLM`
detects which of them it takes.
"""
from __future__ import annotations

from typing import Any

# the order `auto` tries them in: the standard field first
MODES = ("json_schema", "json_object_schema", "tools")
CONSTRAIN_CHOICES = ("auto", *MODES, "none")
TOOL_NAME = "respond"

# statuses that say nothing about the request's format: retry later (408/409/429/502-504),
# wrong key (401/403), wrong model or URL (404), too big (413)
_NOT_ABOUT_FORMAT = {401, 403, 404, 408, 409, 413, 429, 502, 503, 504}
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "tool")


def constraint_fields(mode: str, schema: dict[str, Any], schema_name: str) -> dict[str, Any]:
    """The request fields that ask for output matching ``schema`` in ``mode`` (one of `MODES`)."""
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": schema_name, "schema": schema, "strict": True}}}
    if mode == "json_object_schema":
        return {"response_format": {"type": "json_object", "schema": schema}}
    if mode == "tools":
        tool = {"type": "function", "function": {"name": TOOL_NAME, "parameters": schema, "strict": True}}
        return {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": TOOL_NAME}}}
    raise ValueError(f"unknown constrain mode {mode!r}; expected one of {', '.join(MODES)}")


def tool_arguments(delta: Any) -> str:
    """The text of the first tool call's argument delta in a streamed ``delta`` ('' if none).
    Only call 0 is read: `tools` mode forces one call, and a second one is not the answer."""
    text = []
    for call in getattr(delta, "tool_calls", None) or ():
        function = getattr(call, "function", None)
        if (call.index or 0) == 0 and function is not None and function.arguments:
            text.append(function.arguments)
    return "".join(text)


def rejects_format(exc: BaseException) -> bool:
    """Whether an error answering a probe can mean "this server does not take that format".
    Transient, auth and routing errors cannot: those are raised as they are, and detection
    runs again at the next request. Other 4xx and 5xx can (llama-cpp-python answers an
    unknown ``response_format`` with a 500)."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 600 and status not in _NOT_ABOUT_FORMAT


def about_format(exc: BaseException) -> bool:
    """Whether the error's text names a format field (to tell "cannot constrain" from an
    error every request would get, such as an over-long prompt)."""
    return any(word in error_text(exc).lower() for word in _FORMAT_WORDS)


def error_text(exc: BaseException) -> str:
    """The server's own message in an OpenAI-style error body, else the exception's text."""
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
    return str(message or exc)


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """``HTTP 500: <first line of the server's message>``, cut to ``limit`` characters."""
    lines = error_text(exc).strip().splitlines() or [""]
    text = " ".join(line.strip() for line in lines[:2])
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}: {text}" if status else text
