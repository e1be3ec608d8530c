"""Prompting: render a transcript + tool specs into chat messages and the step's JSON Schema.

The model's output format is fixed (compact JSON, keys in this order):

- a tool-call turn: ``{"calls":[{"tool":"<name>","arguments":{...}}, ...]}``
- a final answer:  ``{"answer": <string, or a value of the output schema>}``

Each tool's call shape puts ``"tool"`` (a ``const``) before ``"arguments"``, so once the
model has picked a name the grammar forces everything up to the first argument value:
the model only chooses names and values.

Rendering is append-only: every message renders the same way whatever comes after it,
and the system prompt depends only on the tool list (not on the step or tool_choice of
a turn). So step n+1's chat messages are step n's plus the assistant's JSON (verbatim as
generated, kept in ``Message.content``) plus one user message holding the tool results;
the chat-templated prompt tokens extend and the prefix cache hits.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from agentrt.schema import close_objects
from agentrt.types import Message, ToolCall, ToolChoice, ToolSpec, new_call_id

Mode = Literal["tools", "schema", "text"]

TOOLS_INSTRUCTIONS = (
    "You can call tools. Reply with JSON only.\n"
    'To call a tool: {{"calls":[{{"tool":"<name>","arguments":{{...}}}}]}}\n'
    'When the results give what you need: {{"answer":"<your answer>"}}\n'
    "{parallel}"
    "Tools:\n{tool_lines}"
)
PARALLEL_LINE = "You may call several tools at once.\n"
SCHEMA_INSTRUCTIONS = "Reply with JSON only, matching this schema: {schema}"


def compact_json(value: Any) -> str:
    """JSON the way the grammar writes it: no whitespace, non-ASCII kept as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class PromptPlan(BaseModel):
    """Everything the LLM needs for one turn, and what `parse_turn` needs to read its reply."""

    chat_messages: list[dict[str, str]]
    json_schema: dict[str, Any] | None = None
    tools: list[ToolSpec] = Field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    mode: Mode = "text"
    parallel_tool_calls: bool = True
    output_schema: dict[str, Any] | None = None
    # the tools the grammar lets this turn call (a subset of `tools` for a named choice)
    allowed_tools: list[str] = Field(default_factory=list)
    allow_answer: bool = True


class TurnOutput(BaseModel):
    """What one model turn said: text for the user, tool calls, and/or a final answer value."""

    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    answer: Any = None


# ---------------------------------------------------------------- system prompt


def _type_label(schema: Any) -> str:
    """A short human type for a JSON Schema fragment: string, integer, "a"|"b", list[number]..."""
    if not isinstance(schema, dict):
        return "any"
    if "const" in schema:
        return compact_json(schema["const"])
    if "enum" in schema:
        return "|".join(compact_json(v) for v in schema["enum"])
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            labels = [_type_label(s) for s in schema[key]]
            return "|".join(dict.fromkeys(labels))
    t = schema.get("type")
    if isinstance(t, list):
        return "|".join(str(x) for x in t)
    if t == "string" and isinstance(schema.get("format"), str):
        return schema["format"]  # date, date-time...: tells a small model the expected spelling
    if t == "array":
        return f"list[{_type_label(schema.get('items', {}))}]"
    if t is None:
        return "any"
    return str(t)


def tool_line(spec: ToolSpec) -> str:
    """One line per tool: ``- name(arg: type, opt?: type): first line of description``."""
    params = spec.parameters or {}
    props: dict[str, Any] = params.get("properties") or {}
    required = set(params.get("required") or [])
    args = ", ".join(
        f"{name}{'' if name in required else '?'}: {_type_label(sub)}" for name, sub in props.items()
    )
    desc = (spec.description or "").strip().splitlines()
    head = f"- {spec.name}({args})"
    return f"{head}: {desc[0].strip()}" if desc and desc[0].strip() else head


def tools_system_prompt(tools: list[ToolSpec], parallel_tool_calls: bool = True) -> str:
    """The system prompt that lists the tools and states the JSON reply format."""
    return TOOLS_INSTRUCTIONS.format(
        parallel=PARALLEL_LINE if parallel_tool_calls else "",
        tool_lines="\n".join(tool_line(t) for t in tools),
    )


# ---------------------------------------------------------------- transcript


def _calls_json(calls: list[ToolCall]) -> str:
    return compact_json({"calls": [{"tool": c.name, "arguments": c.arguments} for c in calls]})


def _is_turn_json(text: str) -> bool:
    """True when ``text`` already is a turn in our format (the raw text the model generated)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and bool(value.keys() & {"calls", "answer"})


def _render_assistant(msg: Message, json_turns: bool) -> str:
    content = msg.content or ""
    if msg.tool_calls:
        # The planner stores the model's raw JSON in `content`: reuse it verbatim so the
        # tokens of a later prompt are exactly those the model produced (number spellings...).
        return content if _is_turn_json(content) else _calls_json(msg.tool_calls)
    # Plain text (an earlier answer from a chat client) is shown in the JSON format the
    # model must use; anything JSON-like is the model's own raw turn (possibly cut short
    # or invalid, then fed back with an error) and stays verbatim.
    if json_turns and not content.lstrip().startswith("{"):
        return compact_json({"answer": content})
    return content


def render_tool_results(results: list[Message], call_names: dict[str, str]) -> str:
    """One user message for a group of tool results: ``Result of <tool>: <content>`` lines."""
    lines = []
    for r in results:
        name = r.name or call_names.get(r.tool_call_id or "", "tool")
        label = "Error from" if r.is_error else "Result of"
        lines.append(f"{label} {name}: {r.content or ''}")
    return "\n".join(lines)


def render_messages(
    messages: list[Message], system_prefix: str | None, json_turns: bool
) -> list[dict[str, str]]:
    """Plain system/user/assistant chat messages, with tool calls and results rendered in.

    ``system_prefix`` (the tool instructions) opens the system message; the caller's own
    system messages follow it. Consecutive ``tool`` messages (one step's results) become one
    user message.
    """
    system_parts = [system_prefix] if system_prefix else []
    body = messages
    while body and body[0].role == "system":
        system_parts.append(body[0].content or "")
        body = body[1:]
    out: list[dict[str, str]] = []
    if system_parts:
        out.append({"role": "system", "content": "\n\n".join(p for p in system_parts if p)})
    call_names: dict[str, str] = {}
    pending: list[Message] = []

    def flush() -> None:
        if pending:
            out.append({"role": "user", "content": render_tool_results(pending, call_names)})
            pending.clear()

    for msg in body:
        if msg.role == "tool":
            pending.append(msg)
            continue
        flush()
        if msg.role == "assistant":
            for c in msg.tool_calls:
                call_names[c.id] = c.name
            out.append({"role": "assistant", "content": _render_assistant(msg, json_turns)})
        else:  # user, or a system message in the middle of the transcript
            out.append({"role": msg.role, "content": msg.content or ""})
    flush()
    return out


# ---------------------------------------------------------------- schemas


def _rewrite_refs(node: Any, prefix: str, root_name: str) -> Any:
    """Copy of ``node`` with local ``$ref``s pointing at the hoisted, prefixed ``$defs``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#"):
                if v == "#":
                    out[k] = f"#/$defs/{root_name}"
                else:
                    parts = v.split("/")
                    if len(parts) == 3 and parts[1] in ("$defs", "definitions"):
                        out[k] = f"#/$defs/{prefix}{parts[2]}"
                    else:
                        raise ValueError(f"unsupported $ref {v!r} in a tool schema: use #/$defs/<name>")
            elif k in ("$defs", "definitions"):
                continue
            else:
                out[k] = _rewrite_refs(v, prefix, root_name)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix, root_name) for v in node]
    return node


def hoist_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Move ``schema``'s ``$defs`` into ``defs`` (names prefixed so tools never collide) and
    return the schema with its references rewritten, ready to nest inside a larger schema."""
    root_name = f"{prefix}root"
    local = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    for name, sub in local.items():
        defs[f"{prefix}{name}"] = _rewrite_refs(sub, prefix, root_name)
    body = _rewrite_refs(schema, prefix, root_name)
    if json.dumps(body).find(f'"#/$defs/{root_name}"') >= 0:
        defs[root_name] = body
    return body


def _arguments_schema(params: dict[str, Any]) -> dict[str, Any]:
    params = copy.deepcopy(params) if params else {}
    params.setdefault("type", "object")
    params.setdefault("properties", {})
    # Small models invent keys; the registry would reject them anyway, so forbid them here.
    params.setdefault("additionalProperties", False)
    return close_objects(params)


def call_schema(spec: ToolSpec, defs: dict[str, Any]) -> dict[str, Any]:
    """``{"tool": <const name>, "arguments": <the tool's parameters>}``, tool first."""
    args = hoist_defs(_arguments_schema(spec.parameters), f"{_safe(spec.name)}__", defs)
    return {
        "type": "object",
        "properties": {"tool": {"type": "string", "const": spec.name}, "arguments": args},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)


def calls_schema(specs: list[ToolSpec], parallel: bool, defs: dict[str, Any]) -> dict[str, Any]:
    """``{"calls": [call, ...]}`` with 1 item, or 1+ items when parallel calls are allowed."""
    items = [call_schema(s, defs) for s in specs]
    array: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items}}
    array["minItems"] = 1
    if not parallel:
        array["maxItems"] = 1
    return {
        "type": "object",
        "properties": {"calls": array},
        "required": ["calls"],
        "additionalProperties": False,
    }


def answer_schema(output_schema: dict[str, Any] | None, defs: dict[str, Any]) -> dict[str, Any]:
    """``{"answer": <string or the output schema>}``."""
    value = {"type": "string"} if output_schema is None else hoist_defs(close_objects(output_schema), "answer__", defs)
    return {
        "type": "object",
        "properties": {"answer": value},
        "required": ["answer"],
        "additionalProperties": False,
    }


# ---------------------------------------------------------------- plan / parse


def _allowed_tools(tools: list[ToolSpec], tool_choice: ToolChoice) -> tuple[list[ToolSpec], bool]:
    """(tools the turn may call, whether it may answer instead)."""
    named = [t for t in tools if t.name == tool_choice]
    if named:
        return named, False
    if tool_choice == "auto":
        return tools, True
    if tool_choice == "required":
        return tools, False
    if tool_choice == "answer":
        return [], True
    known = ", ".join(t.name for t in tools) or "(none)"
    raise ValueError(
        f"tool_choice {tool_choice!r} is not 'auto', 'required', 'none', 'answer' or a known tool; known tools: {known}"
    )


def plan_turn(
    messages: list[Message],
    tools: list[ToolSpec],
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
    output_schema: dict[str, Any] | None = None,
) -> PromptPlan:
    """Build the chat messages and the JSON Schema of the next model turn.

    - no tools (or tool_choice "none"), no output_schema: free text (mode "text");
    - no tools, an output_schema: the output is that object itself (mode "schema");
    - tools: mode "tools"; the schema is anyOf the call shape (only the allowed tools) and,
      unless the choice is "required" or a named tool, the answer shape. The extra choice
      "answer" allows only the answer shape while keeping the tools in the prompt (so the
      transcript renders as in the other steps and the prefix cache still hits).
    """
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tool names: {sorted(n for n in set(names) if names.count(n) > 1)}")
    if tools and tool_choice != "none":
        allowed, may_answer = _allowed_tools(tools, tool_choice)
        defs: dict[str, Any] = {}
        # A named choice means one call of that tool (as in OpenAI's API): never a list of them.
        named = tool_choice not in ("auto", "required", "answer") or any(t.name == tool_choice for t in tools)
        parallel = parallel_tool_calls and not named
        shapes = [calls_schema(allowed, parallel, defs)] if allowed else []
        if may_answer:
            shapes.append(answer_schema(output_schema, defs))
        schema: dict[str, Any] = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
        if defs:
            schema = {**schema, "$defs": defs}
        chat = render_messages(messages, tools_system_prompt(tools, parallel_tool_calls), json_turns=True)
        return PromptPlan(
            chat_messages=chat,
            json_schema=schema,
            tools=tools,
            tool_choice=tool_choice,
            mode="tools",
            parallel_tool_calls=parallel,  # what this turn may do (the prompt keeps the caller's setting)
            output_schema=output_schema,
            allowed_tools=[t.name for t in allowed],
            allow_answer=may_answer,
        )
    if output_schema is not None:
        system = SCHEMA_INSTRUCTIONS.format(schema=compact_json(output_schema))
        chat = render_messages(messages, system, json_turns=False)
        return PromptPlan(
            chat_messages=chat, json_schema=output_schema, tools=tools, tool_choice=tool_choice,
            mode="schema", parallel_tool_calls=parallel_tool_calls, output_schema=output_schema,
        )
    chat = render_messages(messages, None, json_turns=False)
    return PromptPlan(
        chat_messages=chat, json_schema=None, tools=tools, tool_choice=tool_choice,
        mode="text", parallel_tool_calls=parallel_tool_calls,
    )


def _load_json(text: str) -> Any:
    """Parse a turn; tolerate code fences and text around one JSON value (free-text runs)."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`")
        if stripped.startswith("json"):
            stripped = stripped[4:]
        stripped = stripped.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for start, ch in enumerate(stripped):
        if ch in "{[":
            try:
                return decoder.raw_decode(stripped, start)[0]
            except ValueError:
                continue
    snippet = text if len(text) <= 200 else text[:200] + "..."
    raise ValueError(f"the reply is not valid JSON: {snippet!r}")


def _as_call(item: Any, plan: PromptPlan) -> ToolCall:
    if not isinstance(item, dict):
        raise ValueError(f'each call must be an object {{"tool":...,"arguments":{{...}}}}, got {compact_json(item)}')
    name = item.get("tool", item.get("name"))
    args = item.get("arguments", item.get("args", {}))
    if not isinstance(name, str):
        raise ValueError(f'a call has no "tool" name: {compact_json(item)}')
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError(f"the arguments of {name!r} are not a JSON object: {args!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {name!r} must be a JSON object, got {compact_json(args)}")
    allowed = plan.allowed_tools if plan.mode == "tools" else [t.name for t in plan.tools]
    if not allowed:
        raise ValueError("a final answer is required here, not a tool call")
    if name not in allowed:
        raise ValueError(f"unknown tool {name!r}; you may call: {', '.join(allowed)}")
    return ToolCall(id=new_call_id(), name=name, arguments=args)


def parse_turn(text: str, plan: PromptPlan) -> TurnOutput:
    """Read a model turn produced under ``plan``.

    Mode "text": the text is the content. Mode "schema": the parsed object is the answer.
    Mode "tools": ``{"calls":[...]}`` gives tool calls (fresh ids ``call_<hex>``);
    ``{"answer": ...}`` gives the answer (a string answer is also the content).
    Raises ValueError naming the problem when the text does not parse.
    """
    if plan.mode == "text":
        return TurnOutput(content=text, answer=text)
    value = _load_json(text)
    if plan.mode == "schema":
        return TurnOutput(content=compact_json(value), answer=value)
    if isinstance(value, dict) and "calls" in value:
        calls = value["calls"]
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list) or not calls:
            raise ValueError('"calls" must be a non-empty list of {"tool":...,"arguments":{...}}')
        if len(calls) > 1 and not plan.parallel_tool_calls:
            raise ValueError(f"only one call per turn is allowed, got {len(calls)}")
        return TurnOutput(tool_calls=[_as_call(c, plan) for c in calls])
    if isinstance(value, dict) and "answer" in value:
        if not plan.allow_answer:
            raise ValueError(f"a tool call is required here (tool_choice={plan.tool_choice!r}), not an answer")
        answer = value["answer"]
        content = answer if isinstance(answer, str) else compact_json(answer)
        return TurnOutput(content=content, answer=answer)
    if isinstance(value, dict) and ("tool" in value or "name" in value):  # a bare call (free-text runs)
        return TurnOutput(tool_calls=[_as_call(value, plan)])
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return TurnOutput(tool_calls=[_as_call(v, plan) for v in value])
    raise ValueError('the reply must be {"calls":[...]} or {"answer":...}, got ' + compact_json(value)[:200])
