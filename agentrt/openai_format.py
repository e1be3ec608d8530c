"""Between OpenAI's chat format and agentrt's turns, one way for the server's routes and for
`ChatAgentRT` alike: OpenAI tool definitions, ``tool_choice`` spellings and ``response_format`` in;
the turn's `PromptPlan`; a finished completion out as content and tool calls (an output cut by
max_tokens salvaged the same way everywhere); tool calls and usage as OpenAI's JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from agentrt.prompting import PromptPlan, compact_json, plan_turn, render_messages
from agentrt.stream_parser import ToolCallStreamParser
from agentrt.types import Message, ToolCall, ToolChoice, ToolSpec, Usage

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_specs(tools: Sequence[dict[str, Any]]) -> list[ToolSpec]:
    """OpenAI tool definitions (``{"type": "function", "function": {...}}`` or the bare function)."""
    specs = []
    for t in tools:
        fn = t.get("function", t)
        specs.append(ToolSpec(name=fn["name"], description=fn.get("description") or "",
                              parameters=fn.get("parameters") or EMPTY_PARAMETERS))
    return specs


def normalize_tool_choice(tool_choice: Any, names: list[str], where: str = "tools") -> str | None:
    """OpenAI/LangChain tool_choice spellings -> "auto"|"required"|"none"|<tool name> (None: not given).
    Raises ValueError for a name that is not among ``names`` (the ``where``) or a shape that names nothing."""
    if tool_choice is None or tool_choice == "auto" or tool_choice is False:
        return None if tool_choice is None else "auto"
    if tool_choice in ("any", "required") or tool_choice is True:
        return "required"
    if tool_choice == "none":
        return "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not name:
            raise ValueError(f"tool_choice dict {tool_choice!r} names no function")
        tool_choice = name
    if isinstance(tool_choice, str):
        if tool_choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} is not one of the {where} {names}; "
                             "use 'auto', 'any', 'required', 'none' or a tool's name")
        return tool_choice
    raise ValueError(f"tool_choice must be a string, bool, dict or None, not {type(tool_choice).__name__}")


def response_format_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema an OpenAI ``response_format`` asks for (None: free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs a 'schema' dict")
        return schema
    if kind == "text":
        return None
    raise ValueError(f"response_format type {kind!r} is not supported; use 'json_schema', 'json_object' or 'text'")


def plan_request(messages: list[Message], tools: list[ToolSpec], tool_choice: ToolChoice, parallel_tool_calls: bool,
                 output_schema: dict[str, Any] | None, *, instruct_schema: bool = True) -> PromptPlan:
    """The turn's plan for an OpenAI-style request. With an output schema and no tools to call,
    ``instruct_schema=False`` keeps the messages as the prompt, unchanged, and lets the grammar alone
    enforce the schema (what OpenAI's API, vLLM and SGLang do, so a caller that already rendered its
    instructions gets the same prompt); True adds a system line showing the schema (`plan_turn`).
    Raises ValueError for a tool_choice the tools cannot satisfy."""
    if output_schema is not None and not instruct_schema and (not tools or tool_choice == "none"):
        return PromptPlan(chat_messages=render_messages(messages, None, json_turns=False), json_schema=output_schema,
                          tools=tools, tool_choice=tool_choice, mode="schema",
                          parallel_tool_calls=parallel_tool_calls, output_schema=output_schema)
    return plan_turn(messages, tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                     output_schema=output_schema)


@dataclass
class CutTurn:
    """What holds of a tools-mode output cut by max_tokens: the calls whose arguments closed, the
    answer text so far, and why the rest is unusable (None when the JSON closed exactly at the limit)."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None


def salvage_cut_turn(text: str) -> CutTurn:
    """Read a cut tools-mode output as far as it is complete (the streaming parser's view)."""
    parser = ToolCallStreamParser("tools")
    error = None
    try:
        parser.feed(text)
        parser.finish()
    except ValueError as exc:
        error = str(exc)
    return CutTurn(content=parser.content, tool_calls=parser.tool_calls, error=error)


def tool_call_json(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
    """A tool call as OpenAI's ``tool_calls`` entry: ``arguments`` is the JSON text to send (the model's
    own, see `streamed_turn_texts`), else ``call.arguments`` as compact JSON."""
    text = compact_json(call.arguments) if arguments is None else arguments
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": text}}


def streamed_turn_texts(text: str) -> tuple[str | None, list[str]] | None:
    """(content, each call's arguments JSON text) of a complete tools-mode output as the streaming
    parser reads it, i.e. exactly what a streamed response's deltas concatenate to; None when the
    parser cannot read it (a shape only `parse_turn` accepts).

    A non-streamed response must send these texts, not the parsed values re-serialized: the model's
    number ``2.1237107879569874`` re-serializes as ``2.123710787956987`` (the shortest repr of the
    same float), ``1e5`` as ``100000.0``, ``\\u00e9`` as ``é``, so the same generation would read
    differently streamed and not."""
    parser = ToolCallStreamParser("tools")
    try:
        parser.feed(text)
        parser.finish()
    except ValueError:
        return None
    return parser.content, parser.arguments_texts


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object, with ``prompt_tokens_details.cached_tokens``."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
