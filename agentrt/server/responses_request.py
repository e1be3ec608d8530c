"""An OpenAI Responses request (``POST /v1/responses``) -> the chat request the chat route checks.

A Responses request is another spelling of one chat turn: its input items are messages,
function calls and their outputs; its function tools and tool_choice are flatter; ``text.format``
is response_format. Translated into a `ChatCompletionRequest`, it goes through `checked_request`
like a chat request, so its function calls are grammar-constrained exactly the same way.

This server is stateless: what needs stored state (``previous_response_id``, ``conversation``,
``background``...) or tools it does not have (web_search, file_search...) is a 400 naming the
parameter, never silently dropped; so is a parameter it does not know.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentrt.server.errors import APIError, validation_error
from agentrt.server.request_models import TOOL_NAME_PATTERN, ChatCompletionRequest


class _Item(BaseModel):
    # Items a client sends back from an earlier response carry ids, status, phase...: accepted, unused.
    model_config = ConfigDict(extra="allow")


class ContentPartIn(_Item):
    type: str
    text: str | None = None


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPartIn]


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)  # optional in OpenAI's types, but nothing else says which call it answers
    output: str | list[ContentPartIn]


class FunctionTool(_Item):
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # every call is grammar-constrained anyway: strict or not, the same


class FunctionToolChoice(_Item):
    type: Literal["function"]
    name: str


class TextFormat(_Item):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field(default="output", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Item):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses``: OpenAI's Responses API, the stateless subset (function
    tools, input items sent in full each time). Input items and tools are checked one by one
    (`to_chat_request`) so that an unsupported type is a 400 naming it and the supported ones."""

    # Unknown parameters are kept so that `refuse_unsupported` can name them in a 400.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    max_output_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=0)  # logprobs are not returned
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to pad on loopback
    store: bool | None = None  # accepted; nothing is stored either way
    metadata: dict[str, str] | None = None  # echoed in the response
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # keeps this turn's KV pinned for the key's next request
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None


STATELESS = ("this server is stateless and stores no responses or conversations: send the whole "
             "conversation as input items (earlier output items included) on every request")
UNSUPPORTED = {  # parameter -> why not, and what to do instead
    "previous_response_id": STATELESS,
    "conversation": STATELESS,
    "background": "background responses need stored state; send the request without background and wait for it",
    "prompt": "stored prompt templates are not available here; send instructions and input instead",
    "include": "no extra output data (reasoning content, logprobs, sources) is produced here; leave include unset",
    "reasoning": "the model has no reasoning mode; leave reasoning unset",
    "max_tool_calls": "it limits built-in tool calls, and this server has none; leave it unset",
    "context_management": "input is never compacted here; leave it unset",
}
INPUT_ITEMS: dict[str, type[_Item]] = {
    "message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}
TEXT_PARTS = ("input_text", "output_text")


def _is_set(value: Any) -> bool:
    """Whether a parameter asks for something (clients send null, false, [] or {"effort": null} for "no")."""
    if isinstance(value, dict):
        return any(v is not None for v in value.values())
    return value not in (None, False, [])


def refuse_unsupported(req: ResponsesRequest) -> None:
    """A 400 naming the first parameter this server cannot honour (stateful, unknown, or a mode it lacks)."""
    for name, value in (req.model_extra or {}).items():
        if _is_set(value):
            why = UNSUPPORTED.get(name, "it is not a Responses parameter this server knows; remove it")
            raise APIError(400, f"{name} is not supported: {why}", param=name, code="unsupported_parameter")
    if req.truncation == "auto":
        raise APIError(400, "truncation 'auto' is not supported: input items are never dropped here; leave "
                       "truncation unset or 'disabled'", param="truncation", code="unsupported_parameter")
    if req.text is not None and req.text.verbosity is not None:
        raise APIError(400, "text.verbosity is not supported: leave it unset", param="text.verbosity",
                       code="unsupported_parameter")


def _checked(model: type[_Item], raw: Any, *where: str | int) -> Any:
    """``raw`` validated as ``model``; a 400 naming the field (under ``where``) if it does not fit."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *where, *err["loc"])} for err in e.errors(include_url=False)]
        raise validation_error(RequestValidationError(errors)) from None


def input_item(raw: dict[str, Any], i: int) -> MessageItem | FunctionCallItem | FunctionCallOutputItem:
    """Input item ``i``, checked; an item of a type this server does not take is a 400 naming it."""
    kind = raw.get("type", "message" if "role" in raw else None)  # an "easy" message has no type
    if kind is None:
        raise APIError(400, f"input.{i} has no type; give each item a type ({', '.join(INPUT_ITEMS)}), or a role "
                       "for a message", param=f"input.{i}.type", code="invalid_value")
    model = INPUT_ITEMS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise APIError(400, f"input.{i}: item type {kind!r} is not supported; the supported item types are "
                       f"{', '.join(INPUT_ITEMS)} (this server keeps no state and runs no built-in tools)",
                       param=f"input.{i}.type", code="unsupported_item_type")
    return _checked(model, raw, "input", i)


def text_of(content: str | list[ContentPartIn], where: str) -> str:
    """The text of a message's content or a function call's output (only text parts are supported)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS or part.text is None:
            raise APIError(400, f"{where}.{j}: only text content parts ({', '.join(TEXT_PARTS)}) are supported, "
                           f"got {part.type!r}", param=f"{where}.{j}.type", code="unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def checked_arguments(item: FunctionCallItem, i: int) -> str:
    """A function_call item's arguments, which must be a JSON object's text."""
    try:
        args = json.loads(item.arguments or "{}")
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise APIError(400, f"input.{i}.arguments must be a JSON object string", param=f"input.{i}.arguments",
                       code="invalid_value")
    return item.arguments or "{}"


def function_tool(raw: dict[str, Any], i: int) -> FunctionTool:
    """Tool ``i``, which must be a function tool: the server runs no tools itself."""
    kind = raw.get("type")
    if kind != "function":
        raise APIError(400, f"tools.{i}: tool type {kind!r} is not supported; this server has no built-in tools "
                       "(web_search, file_search, code_interpreter, mcp...): define a function tool "
                       '({"type": "function", "name", "parameters"}) and run it yourself',
                       param=f"tools.{i}.type", code="unsupported_tool")
    return _checked(FunctionTool, raw, "tools", i)


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Responses' tool_choice in the chat spelling: the options as they are, a named function nested."""
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function":
        raise APIError(400, f"tool_choice type {choice.get('type')!r} is not supported; use 'auto', 'none', "
                       "'required' or {\"type\": \"function\", \"name\": ...}", param="tool_choice.type",
                       code="unsupported_value")
    named = _checked(FunctionToolChoice, choice, "tool_choice")
    return {"type": "function", "function": {"name": named.name}}


def chat_response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """``text.format`` as the chat ``response_format``."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": fmt.name, "description": fmt.description,
                                                   "schema": fmt.schema_, "strict": fmt.strict}}


@dataclass
class ParamNames:
    """How the chat checks' errors of a translated request are said in Responses terms."""

    sources: list[int]  # messages[k] came from input item sources[k] (-1: the instructions)

    def error(self, err: APIError) -> APIError:
        """``err`` (raised by the chat checks or the engine) with its param and message in Responses names."""
        old = err.param
        new = self.param(old) if old else old
        message = err.message.replace(old, new) if old and new else err.message
        message = message.replace("max_tokens", "max_output_tokens")
        if (new, message) == (old, err.message):
            return err
        return APIError(err.status, message, type=err.type, param=new, code=err.code, headers=err.headers)

    def param(self, param: str) -> str:
        """A chat request's param (``messages.3.content``) as the Responses one (``input.2.content``)."""
        m = re.match(r"messages\.(\d+)", param)
        if m:
            k = int(m.group(1))
            source = self.sources[k] if k < len(self.sources) else -1
            return ("instructions" if source < 0 else f"input.{source}") + param[m.end():]
        for pattern, repl in _RENAMES:
            param, n = pattern.subn(repl, param)
            if n:
                break
        return param


@dataclass
class ChatTranslation:
    """A Responses request as a chat request, its function tools, and the names of its params."""

    request: ChatCompletionRequest
    tools: list[FunctionTool]
    names: ParamNames


_RENAMES = [(re.compile(r"^messages"), "input"), (re.compile(r"^tools\.(\d+)\.function\."), r"tools.\1."),
            (re.compile(r"^response_format\.json_schema\."), "text.format."),
            (re.compile(r"^response_format"), "text.format"),
            (re.compile(r"^max_(completion_)?tokens"), "max_output_tokens")]


def to_chat_request(req: ResponsesRequest) -> ChatTranslation:
    """The chat request that asks for the same turn as ``req`` (400s name Responses params)."""
    refuse_unsupported(req)
    messages: list[dict[str, Any]] = []
    sources: list[int] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
        sources.append(-1)
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, raw in enumerate(items):
        item = input_item(raw, i)
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": checked_arguments(item, i)}}
            if messages and messages[-1].get("tool_calls"):  # consecutive calls: one turn of parallel calls
                messages[-1]["tool_calls"].append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": text_of(item.output, f"input.{i}.output")})
        else:
            messages.append({"role": item.role, "content": text_of(item.content, f"input.{i}.content")})
        sources.append(i)
    tools = [function_tool(raw, i) for i, raw in enumerate(req.tools or [])]
    chat = {
        "model": req.model, "messages": messages,
        "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                  for t in tools] or None,
        "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "response_format": chat_response_format(req.text),
        "temperature": req.temperature, "top_p": req.top_p, "max_completion_tokens": req.max_output_tokens,
        "stream": req.stream, "prompt_cache_key": req.prompt_cache_key,
    }
    names = ParamNames(sources)
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as e:  # the items were checked above: a field the chat request bounds tighter
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise names.error(validation_error(RequestValidationError(errors))) from None
    return ChatTranslation(request, tools, names)
