"""The HTTP server: ``/agent/run``, an OpenAI-compatible ``/v1/chat/completions``, metrics.

`create_app` builds a FastAPI app around one `LLM` (built once, in ``lifespan``, when none
is given: `LocalLLM` on the embedded model) and one `ToolRegistry`, both shared by every
request through ``Depends``. The chat API follows OpenAI's wire format (tools,
tool_choice, parallel_tool_calls, response_format, streaming tool-call deltas, usage with
``prompt_tokens_details.cached_tokens``), so the ``openai`` client, LangChain's
``ChatOpenAI`` and `agentrt.remote.RemoteLLM` talk to it unchanged. Tool-call arguments
are produced under a grammar built from the tools' JSON Schemas, never parsed after the
fact. Every error is an OpenAI-style ``{"error": {...}}`` body with a 4xx status saying
what to fix; a bounded admission queue answers 429 with ``Retry-After`` when full.

The server never runs anything but the registry's tools, and only in ``/agent/run``:
``/v1/chat/completions`` returns tool calls to the client, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, is_dataclass
from typing import Any, AsyncIterator, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentrt.llm import LLM, Completion, CompletionChunk, GenerationParams
from agentrt.prompting import PromptPlan, compact_json, parse_turn, plan_turn, render_messages
from agentrt.stream_parser import ContentDelta, ToolCallArgsDelta, ToolCallStart, ToolCallStreamParser
from agentrt.types import Message, ToolCall, ToolSpec, Usage

log = logging.getLogger("agentrt.server")

DEFAULT_MAX_CONCURRENT = 32
DEFAULT_MAX_QUEUE = 128
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_TOKENS_CAP = 32768  # when the LLM does not say its context length
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


# ====================================================================== errors


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _known_llm_error(exc: BaseException) -> APIError | None:
    """Map the engine's and grammar's input errors to 400s (imported lazily: torch)."""
    try:
        from agentrt.engine.grammar.errors import GrammarCompileError, UnsupportedSchemaError
    except ImportError:  # grammar not built: nothing of it can be raised either
        GrammarCompileError = UnsupportedSchemaError = None  # type: ignore[assignment,misc]
    try:
        from agentrt.engine import ContextOverflowError
    except ImportError:
        ContextOverflowError = None  # type: ignore[assignment,misc]
    if UnsupportedSchemaError is not None and isinstance(exc, UnsupportedSchemaError):
        return APIError(400, str(exc), param="schema", code="unsupported_schema")
    if GrammarCompileError is not None and isinstance(exc, GrammarCompileError):
        return APIError(400, f"the JSON Schema could not be compiled into a grammar: {exc}",
                        param="schema", code="invalid_schema")
    if ContextOverflowError is not None and isinstance(exc, ContextOverflowError):
        return APIError(400, f"{exc}. Shorten the messages or lower max_tokens.",
                        param="messages", code="context_length_exceeded")
    return _remote_error(exc)


def _remote_error(exc: BaseException) -> APIError | None:
    """Errors of a `RemoteLLM` backend (``serve --remote-url``): the upstream's verdict on
    the request passes through; its own failures are a 502."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        err = (exc.body or {}).get("error", exc.body) if isinstance(exc.body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        text = f"the model server refused the request: {message or exc}"
        if exc.status_code in (400, 404, 413, 422):
            code = err.get("code") if isinstance(err, dict) else None
            return APIError(400, text, param=err.get("param") if isinstance(err, dict) else None, code=code)
        if exc.status_code == 429:
            return APIError(429, text, type="rate_limit_error", code="upstream_busy", headers={"Retry-After": "1"})
        return APIError(502, text, type="server_error", code="upstream_error")
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return APIError(502, f"the model server could not be reached: {exc}", type="server_error",
                        code="upstream_unreachable")
    return None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail}); send a JSON object",
                        code="invalid_json")
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        path = ".".join(loc) or "body"
        param = param or path
        parts.append(f"{path}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return APIError(400, "invalid request: " + "; ".join(parts) + more, param=param, code="invalid_value")


# ====================================================================== admission


class QueueTicket:
    """A held slot of the admission queue; `release` is idempotent (streams release late)."""

    def __init__(self, queue: "AdmissionQueue"):
        self._queue: AdmissionQueue | None = queue

    def release(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            queue._release()


class AdmissionQueue:
    """At most ``max_concurrent`` requests at the LLM and ``max_queue`` waiting; beyond
    that a request is refused at once with 429 and ``Retry-After`` (never piled up)."""

    def __init__(self, max_concurrent: int, max_queue: int, retry_after_s: int = 1):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent, self.max_queue, self.retry_after_s = max_concurrent, max_queue, retry_after_s
        self.running = 0
        self.waiting = 0
        self._sem: asyncio.Semaphore | None = None  # made in the serving loop

    async def acquire(self) -> QueueTicket:
        if self.running + self.waiting >= self.max_concurrent + self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({self.running} running, {self.waiting} queued); retry later",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after_s)},
            )
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrent)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return QueueTicket(self)

    def _release(self) -> None:
        self.running -= 1
        assert self._sem is not None
        self._sem.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        ticket = await self.acquire()
        try:
            yield
        finally:
            ticket.release()


# ====================================================================== metrics


class ServerMetrics:
    """Prometheus metrics in a registry of this app's own (tests build several apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("agentrt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("agentrt_request_latency_seconds", "HTTP request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("agentrt_ttft_seconds", "time to first token of each generation", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.step = Histogram("agentrt_agent_step_seconds", "wall time of one agent step (model + tools)",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.steps_per_run = Histogram("agentrt_agent_steps", "steps per agent run", registry=r,
                                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.tokens = Counter("agentrt_tokens", "tokens by kind (prompt, completion, cached)", ["kind"], registry=r)
        self.cache_hit_rate = Gauge("agentrt_prefix_cache_hit_rate",
                                    "share of prompt tokens served from the prefix cache", registry=r)
        self.queue_depth = Gauge("agentrt_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("agentrt_running_requests", "requests being served", registry=r)
        self.engine = Gauge("agentrt_engine", "engine statistics (LLMEngine.stats())", ["stat"], registry=r)
        self._prompt = self._cached = 0

    def observe_usage(self, usage: Usage, ttft_s: float | None = None) -> None:
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)
        self.tokens.labels("cached").inc(usage.cached_tokens)
        self._prompt += usage.prompt_tokens
        self._cached += usage.cached_tokens
        if self._prompt:
            self.cache_hit_rate.set(self._cached / self._prompt)
        if ttft_s:
            self.ttft.observe(ttft_s)

    def render(self, queue: AdmissionQueue, llm: Any) -> bytes:
        self.queue_depth.set(queue.waiting)
        self.running.set(queue.running)
        stats_fn = getattr(llm, "stats", None)
        if callable(stats_fn):
            try:
                stats = stats_fn()
                items = asdict(stats) if is_dataclass(stats) else dict(getattr(stats, "__dict__", {}))
                for name, value in items.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.engine.labels(name).set(value)
            except Exception:  # metrics must never take the endpoint down
                log.exception("reading engine stats failed")
        return generate_latest(self.registry)


# ====================================================================== wire models (OpenAI)


class _Loose(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, logprobs=False...): accept them.
    model_config = ConfigDict(extra="allow")


class FunctionCallIn(_Loose):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Loose):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ContentPart(_Loose):
    type: str
    text: str | None = None


class ChatMessageIn(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Loose):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Loose):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Loose):
    name: str


class NamedToolChoice(_Loose):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Loose):
    name: str = Field(default="output", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatCompletionRequest(_Loose):
    """The body of ``POST /v1/chat/completions`` (OpenAI's, minus what a local model cannot do:
    ``n`` must be 1; logprobs are not returned)."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100000)  # vLLM / SGLang extension
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class AgentRunRequest(_Loose):
    """The body of ``POST /agent/run``: a task (or a transcript), which of the server's
    tools the agent may use, and how long it may take."""

    task: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessageIn] | None = Field(default=None, min_length=1)
    tools: list[str] | None = None  # None: every tool of the server's registry
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    max_steps: int = Field(default=8, ge=1, le=64)
    output_schema: dict[str, Any] | None = None
    system_prompt: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False


# ====================================================================== request -> plan


def _text_of(content: str | list[ContentPart] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{where}: only text content parts are supported, got {part.type!r}",
                           param=where, code="unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def to_messages(messages: list[ChatMessageIn]) -> list[Message]:
    """OpenAI chat messages -> agentrt `Message`s (tool-call arguments decoded)."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        content = _text_of(m.content, f"{where}.content")
        calls = []
        for j, c in enumerate(m.tool_calls or []):
            try:
                args = json.loads(c.function.arguments or "{}")
            except json.JSONDecodeError:
                args = None
            if not isinstance(args, dict):
                raise APIError(400, f"{where}.tool_calls.{j}.function.arguments must be a JSON object string",
                               param=f"{where}.tool_calls.{j}.function.arguments", code="invalid_value")
            calls.append(ToolCall(id=c.id, name=c.function.name, arguments=args))
        if calls and m.role != "assistant":
            raise APIError(400, f"{where}: only assistant messages carry tool_calls", param=where)
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(400, f"{where}: a tool message needs tool_call_id", param=f"{where}.tool_call_id")
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role=role, content=content, tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name))
    return out


def _check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema must be an object schema dict that is itself a valid schema."""
    import jsonschema

    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON Schema object", param=param, code="invalid_schema")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"{param} is not a valid JSON Schema: {e.message}", param=param,
                       code="invalid_schema") from None
    except Exception as e:  # e.g. an unresolvable $schema or $ref
        raise APIError(400, f"{param} is not a usable JSON Schema: {e}", param=param, code="invalid_schema") from None
    return schema


def chat_plan(req: ChatCompletionRequest) -> PromptPlan:
    """Turn a chat request into the turn's `PromptPlan` (messages + grammar schema)."""
    messages = to_messages(req.messages)
    tools: list[ToolSpec] = []
    for i, t in enumerate(req.tools or []):
        params = t.function.parameters or {"type": "object", "properties": {}}
        _check_schema(params, f"tools.{i}.function.parameters")
        if params.get("type", "object") != "object":
            raise APIError(400, f"tools.{i}.function.parameters must describe an object (type: object)",
                           param=f"tools.{i}.function.parameters", code="invalid_schema")
        tools.append(ToolSpec(name=t.function.name, description=t.function.description or "", parameters=params))
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool_choice = choice.function.name
        if tool_choice not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "(no tools given)"
            raise APIError(400, f"tool_choice names {tool_choice!r}, which is not in tools ({known})",
                           param="tool_choice", code="unknown_tool")
    else:
        tool_choice = choice or "auto"
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice")
    output_schema = None
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        output_schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                           param="response_format.json_schema.schema")
        output_schema = _check_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
    if output_schema is not None and (not tools or tool_choice == "none"):
        # As OpenAI, vLLM and SGLang do: the messages are the prompt, unchanged, and the
        # grammar enforces the schema. A remote planner (RemoteLLM) has already rendered
        # its instructions into them, so its prompt is the same as in-process.
        return PromptPlan(chat_messages=render_messages(messages, None, json_turns=False),
                          json_schema=output_schema, tools=tools, tool_choice=tool_choice, mode="schema",
                          parallel_tool_calls=req.parallel_tool_calls, output_schema=output_schema)
    try:
        return plan_turn(messages, tools, tool_choice=tool_choice,
                         parallel_tool_calls=req.parallel_tool_calls, output_schema=output_schema)
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from None


def _max_model_len(llm: Any) -> int | None:
    engine = getattr(llm, "sync_engine", None)
    value = getattr(engine, "max_model_len", None)
    return value if isinstance(value, int) else None


def generation_params(llm: Any, plan: PromptPlan, max_tokens: int | None, temperature: float | None,
                      top_p: float | None = None, stop: str | list[str] | None = None,
                      seed: int | None = None, top_k: int | None = None) -> GenerationParams:
    """The request's sampling settings, checked against the model's context window."""
    limit = _max_model_len(llm) or MAX_TOKENS_CAP
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} exceeds the model's context window ({limit} tokens)",
                       param="max_tokens", code="invalid_value")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if plan.mode != "text":
        stops = []  # the grammar decides where JSON ends; a stop string would cut it
    params = GenerationParams(
        max_tokens=max_tokens or min(1024, limit),
        temperature=0.0 if temperature is None else temperature,  # greedy by default: small models
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        seed=seed,
        stop=stops,
    )
    count = getattr(llm, "prompt_token_ids", None)
    if callable(count) and _max_model_len(llm):
        try:
            n = len(count(plan.chat_messages))
        except Exception as e:  # e.g. a chat template that refuses this role order
            raise APIError(400, f"the messages cannot be rendered with the model's chat template: {e}",
                           param="messages", code="invalid_messages") from None
        if n + params.max_tokens > limit:
            explicit = max_tokens is not None
            if explicit or n >= limit:
                raise APIError(400, f"the prompt has {n} tokens and max_tokens is {params.max_tokens}: together "
                               f"over the context window of {limit} tokens. Shorten the messages or lower max_tokens.",
                               param="messages", code="context_length_exceeded")
            params.max_tokens = limit - n  # the default budget shrinks to what fits
    return params


# ====================================================================== responses


def _usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def completion_message(completion: Completion, plan: PromptPlan) -> tuple[dict[str, Any], str]:
    """(the OpenAI assistant message, finish_reason) of a finished completion."""
    if completion.finish_reason == "length" and plan.mode == "tools":
        # Cut before the JSON closed: no tool call is passed off as complete.
        parser = ToolCallStreamParser("tools")
        with contextlib.suppress(ValueError):
            parser.feed(completion.text)
        return {"role": "assistant", "content": parser.content}, "length"
    finish = "length" if completion.finish_reason == "length" else "stop"
    if plan.mode != "tools":
        return {"role": "assistant", "content": completion.text}, finish
    try:
        turn = parse_turn(completion.text, plan)
    except ValueError as e:
        raise APIError(502, f"the model's output did not parse as a turn: {e}", type="server_error",
                       code="model_output_invalid") from None
    if turn.tool_calls:
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.name, "arguments": compact_json(c.arguments)}} for c in turn.tool_calls]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    content = turn.content if turn.content is not None else compact_json(turn.answer)
    return {"role": "assistant", "content": content}, finish


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _event_delta(ev: Any) -> dict[str, Any]:
    if isinstance(ev, ContentDelta):
        return {"content": ev.text}
    if isinstance(ev, ToolCallStart):
        return {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                "function": {"name": ev.name, "arguments": ""}}]}
    assert isinstance(ev, ToolCallArgsDelta)
    return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.json_fragment}}]}


async def _first_chunk(stream: AsyncIterator[CompletionChunk]) -> CompletionChunk | None:
    """Start a generation and wait for its first chunk, so that input errors (schema,
    context window) still become a 4xx before any byte of the response is sent."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as e:
        err = _known_llm_error(e)
        if err is None:
            raise
        raise err from None


async def _close(stream: Any) -> None:
    # Shielded: closing aborts the request in the engine (frees its KV blocks), which
    # must happen even while the surrounding task is being cancelled by a disconnect.
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await stream.aclose()


# ====================================================================== the app


class ServerState:
    """What every route shares: the LLM, the tools, the admission queue, the metrics."""

    def __init__(self, llm: LLM | None, registry: Any, *, api_keys: list[str], queue: AdmissionQueue,
                 model_name: str | None):
        self.llm = llm
        self.registry = registry
        self.api_keys = api_keys
        self.queue = queue
        self.metrics = ServerMetrics()
        self._model_name = model_name
        self.started = int(time.time())

    @property
    def model_name(self) -> str:
        return self._model_name or getattr(self.llm, "model_name", None) or "agentrt"


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.agentrt
    if state.llm is None:
        raise APIError(503, "the model is still loading; retry shortly", type="server_error",
                       code="model_loading", headers={"Retry-After": "2"})
    return state


def check_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server was started with API keys."""
    state: ServerState = request.app.state.agentrt
    if not state.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in state.api_keys):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


class ServerMiddleware:
    """Pure-ASGI middleware: refuses bodies over ``max_body_bytes`` (413, whether the size
    is declared or only discovered while reading) and counts requests for /metrics."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "started": False}
        limit = self.max_body_bytes

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and declared.isdigit():
                if int(declared) > limit:
                    await too_large.response()(scope, receive, send_)
                else:  # the server's HTTP framing holds the client to the declared length
                    await self.app(scope, receive, send_)
                return
            # No declared length (chunked): read the body here, up to the limit, then replay it.
            parts, seen = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                parts.append(message.get("body", b""))
                seen += len(parts[-1])
                if seen > limit:
                    await too_large.response()(scope, receive, send_)
                    return
                if not message.get("more_body", False):
                    break
            replayed = False

            async def receive_() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(parts), "more_body": False}
                return await receive()

            await self.app(scope, receive_, send_)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


def create_app(
    llm: LLM | None = None,
    registry: Any = None,
    *,
    api_keys: list[str] | str | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_name: str | None = None,
    model: str | None = None,
    retry_after_s: int = 1,
) -> FastAPI:
    """Build the server app.

    ``llm``: the model behind every route; None builds ``LocalLLM(model)`` in ``lifespan``
    (``model`` None = the embedded SmolLM2). ``registry``: the tools ``/agent/run`` may run
    (None = the built-in tools that read no files, see `default_server_registry`). ``api_keys``: if given, every route but
    ``/health`` and ``/metrics`` needs ``Authorization: Bearer <key>``. At most
    ``max_concurrent`` requests run at once and ``max_queue`` wait; more get 429.
    """
    if isinstance(api_keys, str):
        api_keys = [api_keys]
    if registry is None:
        registry = default_server_registry()
    state = ServerState(llm, registry, api_keys=list(api_keys or []),
                        queue=AdmissionQueue(max_concurrent, max_queue, retry_after_s), model_name=model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = None
        if state.llm is None:
            from agentrt.llm import LocalLLM

            owned = await anyio.to_thread.run_sync(lambda: LocalLLM(model))
            state.llm = owned
        try:
            yield
        finally:
            engine = getattr(owned, "engine", None)
            if engine is not None and hasattr(engine, "shutdown"):
                engine.shutdown()

    app = FastAPI(title="agentrt", version="0.1.0", lifespan=lifespan,
                  description="Agent runs with grammar-constrained tool calls, and an OpenAI-compatible chat API.")
    app.state.agentrt = state
    app.add_middleware(ServerMiddleware, max_body_bytes=max_body_bytes, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind, code=kind)
        err.headers = dict(exc.headers or {})
        return err.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        err = _known_llm_error(exc)
        if err is not None:
            return err.response()
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    _add_routes(app)
    return app


def default_server_registry(files_root: str | None = None) -> Any:
    """The built-in tools a server offers by default: the pure ones (calculator, clock,
    units) only, unless ``files_root`` names the one folder the file and data tools may
    read, so that no client can read the server's files by default."""
    from agentrt.registry import ToolRegistry

    try:
        from agentrt.tools import builtin_registry
        from agentrt.tools.data import data_tools
        from agentrt.tools.files import FileSandbox, file_tools
    except ImportError:  # built-in tools not there: serve none
        return ToolRegistry()
    if files_root is not None:
        return builtin_registry(files_root)
    registry = builtin_registry()
    reads_files = {t.name for t in file_tools(None)} | {t.name for t in data_tools(FileSandbox(None))}
    return registry.subset([n for n in registry.names if n not in reads_files])


def _add_routes(app: FastAPI) -> None:
    auth = [Depends(check_api_key)]

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness, and whether the model is loaded."""
        state: ServerState = request.app.state.agentrt
        return {"status": "ok" if state.llm is not None else "loading", "model": state.model_name}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: TTFT and step histograms, tokens, cache hit rate, queue depth."""
        state: ServerState = request.app.state.agentrt
        return Response(state.metrics.render(state.queue, state.llm), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models(state: ServerState = Depends(get_state)) -> dict[str, Any]:
        """The one model this server serves."""
        return {"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "agentrt"}]}

    @app.get("/tools", dependencies=auth)
    async def tools(request: Request) -> dict[str, Any]:
        """The tools ``/agent/run`` may use, with their JSON Schemas."""
        state: ServerState = request.app.state.agentrt
        return {"tools": [s.model_dump() for s in state.registry.specs()]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request,
                               state: ServerState = Depends(get_state)) -> Any:
        """OpenAI-compatible chat completions with grammar-constrained tool calls."""
        plan = chat_plan(req)
        params = generation_params(state.llm, plan, req.max_completion_tokens or req.max_tokens,
                                   req.temperature, req.top_p, req.stop, req.seed, req.top_k)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        ticket = await state.queue.acquire()
        stream = state.llm.stream(plan.chat_messages, json_schema=plan.json_schema, params=params)
        try:
            first = await _first_chunk(stream)
        except BaseException:
            await _close(stream)
            ticket.release()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream_chat(state, plan, stream, first, ticket, cid, created, include_usage)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(_finish_stream, stream, ticket))
        try:
            completion = await _unless_disconnected(request, lambda: _drain(stream, first))
        finally:
            await _close(stream)
            ticket.release()
        state.metrics.observe_usage(completion.usage, completion.ttft_s)
        message, finish = completion_message(completion, plan)
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": _usage_json(completion.usage)}

    @app.post("/agent/run", dependencies=auth)
    async def agent_run(req: AgentRunRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
        """Run an agent on the server's tools: the answer and the full step trace
        (or, with ``stream: true``, Server-Sent Events as the run goes)."""
        agent, task = await build_agent(state, req)
        ticket = await state.queue.acquire()
        if req.stream:
            return StreamingResponse(_stream_run(state, agent, task, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(ticket.release))
        try:
            result = await _unless_disconnected(request, lambda: agent.run(task))
        finally:
            ticket.release()
        _observe_run(state.metrics, result)
        return _result_json(state, result)


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) answer was ready."""


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await ``work()``, cancelling it if the client disconnects first (so an abandoned
    request stops generating and frees its KV blocks instead of running to the end)."""
    result: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(0.25)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        result.append(await work())
        tg.cancel_scope.cancel()
    if not result:
        raise ClientDisconnected
    return result[0]


async def _drain(stream: AsyncIterator[CompletionChunk], first: CompletionChunk | None) -> Completion:
    last = first.completion if first is not None else None
    async for chunk in stream:
        last = chunk.completion or last
    if last is None:
        raise APIError(502, "the model stream ended without a completion", type="server_error")
    return last


async def _finish_stream(stream: Any, ticket: QueueTicket) -> None:
    await _close(stream)
    ticket.release()


async def _stream_chat(state: ServerState, plan: PromptPlan, stream: AsyncIterator[CompletionChunk],
                       first: CompletionChunk | None, ticket: QueueTicket, cid: str, created: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """OpenAI-style SSE: role, then content / tool-call deltas as the parser finds them,
    then the finish reason (and usage when asked), then ``[DONE]``."""
    model = state.model_name
    parser = ToolCallStreamParser(plan.mode)
    made_calls = False
    completion: Completion | None = None
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})

        async def chunks() -> AsyncIterator[CompletionChunk]:
            if first is not None:
                yield first
            async for c in stream:
                yield c

        async for chunk in chunks():
            if chunk.delta:
                try:
                    events = parser.feed(chunk.delta)
                except ValueError as e:
                    yield _stream_error(f"the model's output did not parse: {e}")
                    return
                for ev in events:
                    made_calls = made_calls or isinstance(ev, ToolCallStart)
                    yield _chunk(cid, created, model, _event_delta(ev))
            if chunk.completion is not None:
                completion = chunk.completion
        if completion is None:
            yield _stream_error("the model stream ended without a completion")
            return
        finish = "length" if completion.finish_reason == "length" else "stop"
        if finish == "stop" and plan.mode == "tools":
            try:
                for ev in parser.finish():
                    yield _chunk(cid, created, model, _event_delta(ev))
            except ValueError as e:
                yield _stream_error(f"the model's output did not parse: {e}")
                return
            if made_calls:
                finish = "tool_calls"
        yield _chunk(cid, created, model, {}, finish)
        state.metrics.observe_usage(completion.usage, completion.ttft_s)
        if include_usage:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage_json(completion.usage)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # A disconnect cancels this generator: abort the generation, free the slot.
        await _close(stream)
        ticket.release()


def _stream_error(message: str) -> str:
    err = APIError(502, message, type="server_error", code="model_output_invalid")
    return f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"


# ====================================================================== /agent/run

AGENT_RUN_TIMEOUT_S = 600.0  # no run holds a slot longer than this


def schema_output_type(schema: dict[str, Any]) -> type[BaseModel]:
    """A pydantic type for `Agent`'s ``output_type`` from a raw JSON Schema: its
    ``model_json_schema()`` is that schema (the grammar) and validation uses jsonschema."""
    import copy

    import jsonschema
    from pydantic import RootModel, model_validator

    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = validator_cls(schema)

    class SchemaOutput(RootModel[Any]):
        @model_validator(mode="after")
        def _valid(self) -> "SchemaOutput":
            error = jsonschema.exceptions.best_match(validator.iter_errors(self.root))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                raise ValueError(f"the answer does not match output_schema at {where}: {error.message}")
            return self

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return copy.deepcopy(schema)

    return SchemaOutput


async def build_agent(state: ServerState, req: AgentRunRequest) -> tuple[Any, str | list[Message]]:
    """Check an ``/agent/run`` request and build its `Agent` (and task) or raise a 400."""
    from agentrt.planner import Agent

    if (req.task is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'task' (a string) or 'messages' (a chat transcript)",
                       param="task", code="invalid_value")
    task: str | list[Message] = req.task if req.task is not None else to_messages(req.messages or [])
    registry = state.registry
    if req.tools is not None:
        unknown = [n for n in req.tools if n not in registry]
        if unknown:
            known = ", ".join(registry.names) or "(none)"
            raise APIError(400, f"unknown tool(s) {', '.join(map(repr, unknown))}; this server's tools: {known}",
                           param="tools", code="unknown_tool")
        registry = registry.subset(req.tools)
    output_type = None
    if req.output_schema is not None:
        schema = _check_schema(req.output_schema, "output_schema")
        compile_fn = getattr(state.llm, "compile", None)
        if callable(compile_fn):  # unsupported keywords -> 400 now, not a failed run later
            try:
                await anyio.to_thread.run_sync(compile_fn, schema)
            except Exception as e:
                err = _known_llm_error(e)
                if err is None:
                    raise
                err.param = "output_schema"
                raise err from None
        output_type = schema_output_type(schema)
    limit = _max_model_len(state.llm) or MAX_TOKENS_CAP
    if req.max_tokens is not None and req.max_tokens > limit:
        raise APIError(400, f"max_tokens={req.max_tokens} exceeds the model's context window ({limit} tokens)",
                       param="max_tokens", code="invalid_value")
    params = GenerationParams(max_tokens=req.max_tokens or 256,
                              temperature=0.0 if req.temperature is None else req.temperature)
    _check_first_prompt_fits(state.llm, task, registry, req, output_type, params)
    try:
        agent = Agent(state.llm, registry, system_prompt=req.system_prompt, tool_choice=req.tool_choice,
                      parallel_tool_calls=req.parallel_tool_calls, max_steps=req.max_steps,
                      output_type=output_type, run_timeout_s=AGENT_RUN_TIMEOUT_S, params=params)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice", code="invalid_value") from None
    return agent, task


def _check_first_prompt_fits(llm: Any, task: str | list[Message], registry: Any, req: AgentRunRequest,
                             output_type: Any, params: GenerationParams) -> None:
    """A task too long for the context window is a 400 now, not a failed run later."""
    count, limit = getattr(llm, "prompt_token_ids", None), _max_model_len(llm)
    if not callable(count) or not limit:
        return
    messages = [Message(role="user", content=task)] if isinstance(task, str) else list(task)
    if req.system_prompt:
        messages.insert(0, Message(role="system", content=req.system_prompt))
    schema = output_type.model_json_schema() if output_type is not None else None
    try:
        plan = plan_turn(messages, registry.specs(), req.tool_choice, req.parallel_tool_calls, schema)
        n = len(count(plan.chat_messages))
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice", code="invalid_value") from None
    except Exception as e:  # a chat template that refuses the transcript
        raise APIError(400, f"the messages cannot be rendered with the model's chat template: {e}",
                       param="messages", code="invalid_messages") from None
    if n + params.max_tokens > limit:
        raise APIError(400, f"the first prompt has {n} tokens and each step may add {params.max_tokens}: over the "
                       f"context window of {limit} tokens. Shorten the task or lower max_tokens.",
                       param="task" if isinstance(task, str) else "messages", code="context_length_exceeded")


def _answer_json(answer: Any) -> Any:
    from pydantic import RootModel

    if isinstance(answer, RootModel):
        return answer.root
    if isinstance(answer, BaseModel):
        return answer.model_dump(mode="json")
    return answer


def _result_json(state: ServerState, result: Any) -> dict[str, Any]:
    body = result.model_dump(mode="json", exclude={"answer"})
    body["answer"] = _answer_json(result.answer)
    body["model"] = state.model_name
    return body


def _observe_step(metrics: ServerMetrics, step: Any) -> None:
    metrics.step.observe(step.duration_s or (step.ttft_s + step.decode_s + step.tool_time_s))
    metrics.observe_usage(Usage(prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens,
                                cached_tokens=step.cached_tokens), step.ttft_s)


def _observe_run(metrics: ServerMetrics, result: Any) -> None:
    for step in result.steps:
        _observe_step(metrics, step)
    metrics.steps_per_run.observe(len(result.steps))


async def _stream_run(state: ServerState, agent: Any, task: str | list[Message], ticket: QueueTicket
                      ) -> AsyncIterator[str]:
    """SSE of an agent run: ``event: <type>`` + ``data: <json>`` per step, tool call, tool
    result and final answer; the last event is ``run_finished`` with the whole result.
    A client that disconnects cancels this generator, which closes the run (its
    generation is aborted and its KV blocks freed)."""
    events = agent.astream(task)
    try:
        async for ev in events:
            kind = getattr(ev, "type", type(ev).__name__)
            if kind == "step_finished":
                _observe_step(state.metrics, ev.step)
            if kind == "run_finished":
                state.metrics.steps_per_run.observe(len(ev.result.steps))
                data = {"type": kind, "run_id": ev.run_id, "result": _result_json(state, ev.result)}
            elif kind == "final_answer":
                data = {"type": kind, "run_id": ev.run_id, "answer": _answer_json(ev.answer)}
            else:
                data = ev.model_dump(mode="json")
            yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
    finally:
        await _close(events)
        ticket.release()
