"""LangChain chat model over agentrt: `ChatAgentRT`, plus tool interop both ways.

`ChatAgentRT` is a `BaseChatModel` backed by the in-process engine (default: the
embedded SmolLM2 model), by an agentrt / OpenAI-compatible server (``base_url``), or by
any object implementing the `agentrt.llm.LLM` protocol (``llm=``, e.g. ScriptedLLM in
tests). Every turn goes through `agentrt.prompting.plan_turn`: bound tools and
structured-output schemas become a JSON Schema that the engine compiles into a grammar,
so tool-call arguments and structured outputs are valid by construction.

`to_langchain_tool` / `from_langchain_tool` convert between agentrt registry tools and
LangChain tools so one set of tools serves both.

``langchain-core`` is an optional dependency (``pip install 'agentrt[langchain]'``) and
is imported only by this module.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal, TypeVar

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
    from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
    from langchain_core.utils import secret_from_env
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from langchain_core.utils.pydantic import is_basemodel_subclass
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "agentrt.langchain needs langchain-core; install it with: pip install 'agentrt[langchain]'"
    ) from exc

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, create_model

from agentrt.llm import LLM, Completion, GenerationParams
from agentrt.openai_format import (normalize_tool_choice, plan_request, response_format_schema, salvage_cut_turn,
                                   tool_specs)
from agentrt.registry import Tool, ToolRegistry
from agentrt.stream_parser import ContentDelta, ToolCallArgsDelta, ToolCallStart, ToolCallStreamParser
from agentrt.types import Message, ToolCall, ToolSpec, Usage

__all__ = ["ChatAgentRT", "LangChainTool", "to_langchain_tool", "from_langchain_tool", "shared_local_llm", "DEFAULT_MODEL_NAME"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Reported as the model name before the embedded model is loaded (LangSmith params)."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# One background event loop for the sync API
# --------------------------------------------------------------------------------------


class _LoopThread:
    """A daemon thread running one asyncio loop, shared by every sync call in the process.

    LangChain's sync entry points (invoke/stream/batch) must drive our async LLMs. Running
    them all on one long-lived loop (rather than ``asyncio.run`` per call) keeps any
    loop-bound state of an LLM client valid across calls, works when the caller's thread
    already has a running loop (Jupyter, LangGraph's sync nodes), and lets the requests of
    ``batch`` (one thread each) run concurrently so the engine batches them.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="agentrt-langchain-loop", daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the shared loop and block until it finishes."""
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.loop())
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: do not leave the request running
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Drive an async iterator on the shared loop, yielding its items here."""
        try:
            while True:
                try:
                    item = self.run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            # The consumer stopped early (or failed): close the generator on its loop so
            # the request is aborted and its KV blocks are freed.
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self.run(aclose())


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


_LOOP = _LoopThread()


# --------------------------------------------------------------------------------------
# Which LLM serves a model: one LocalLLM per model path per process
# --------------------------------------------------------------------------------------

_LOCAL_LLMS: dict[str | None, LLM] = {}
_LOCAL_LOCK = threading.Lock()


def _model_key(model: str | None) -> str | None:
    """One cache key per model file: None for the embedded model however it is named."""
    if model is None:
        return None
    path = os.path.realpath(os.path.expanduser(model))
    try:
        from agentrt.engine.loader import embedded_model_path

        if path == os.path.realpath(embedded_model_path()):
            return None
    except (ImportError, FileNotFoundError):  # no embedded model installed: not it
        pass
    return path


def shared_local_llm(model: str | None = None) -> LLM:
    """The process-wide `LocalLLM` for ``model`` (None = the embedded model), built on
    first use. Loading a model takes seconds; every `ChatAgentRT` on the same model shares
    one engine, so its prefix cache and continuous batching serve them all."""
    key = _model_key(model)
    with _LOCAL_LOCK:
        llm = _LOCAL_LLMS.get(key)
        if llm is None:
            from agentrt.llm import LocalLLM

            llm = LocalLLM(key)
            _LOCAL_LLMS[key] = llm
        return llm


# --------------------------------------------------------------------------------------
# LangChain messages -> agentrt messages
# --------------------------------------------------------------------------------------

# Content blocks that carry no text of their own: the tool calls they describe are read
# from ``AIMessage.tool_calls``; reasoning is not shown back to the model.
_SKIPPED_BLOCKS = {"tool_use", "tool_call", "function_call", "tool_call_chunk", "reasoning", "thinking"}


def _content_text(content: str | list[Any], where: str) -> str:
    """The text of a message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind == "json":
            parts.append(json.dumps(block.get("json"), ensure_ascii=False))
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise ValueError(
                f"ChatAgentRT reads text only, but the {where} holds a {kind!r} content block; "
                "pass text (or a 'json' block) instead"
            )
    return "\n".join(p for p in parts if p)


def to_agentrt_messages(messages: Sequence[BaseMessage]) -> list[Message]:
    """Map a LangChain transcript to agentrt `Message`s (tool calls and results kept).

    A `ToolMessage` with ``status="error"`` becomes ``is_error=True``; its tool name is
    taken from the message or, when absent, from the assistant call it answers.
    """
    out: list[Message] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        where = f"message {i} ({type(msg).__name__})"
        if isinstance(msg, SystemMessage):
            out.append(Message(role="system", content=_content_text(msg.content, where)))
        elif isinstance(msg, HumanMessage):
            out.append(Message(role="user", content=_content_text(msg.content, where), name=msg.name))
        elif isinstance(msg, AIMessage):
            calls = [
                ToolCall(id=tc.get("id") or f"call_{i}_{j}", name=tc["name"], arguments=tc.get("args") or {})
                for j, tc in enumerate(msg.tool_calls)
            ]
            for c in calls:
                call_names[c.id] = c.name
            text = _content_text(msg.content, where)
            out.append(Message(role="assistant", content=text or None, tool_calls=calls))
        elif isinstance(msg, ToolMessage):
            name = msg.name or call_names.get(msg.tool_call_id)
            out.append(
                Message(
                    role="tool",
                    content=_content_text(msg.content, where),
                    tool_call_id=msg.tool_call_id,
                    name=name,
                    is_error=msg.status == "error",
                )
            )
        elif isinstance(msg, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(msg.role, msg.role)
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"{where} has role {msg.role!r}; use system, user, assistant or a ToolMessage")
            out.append(Message(role=role, content=_content_text(msg.content, where)))  # type: ignore[arg-type]
        else:
            raise ValueError(
                f"{where} is not supported; use SystemMessage, HumanMessage, AIMessage or ToolMessage"
            )
    return out


# --------------------------------------------------------------------------------------
# Bound options -> the turn's tools / tool_choice / output schema
# --------------------------------------------------------------------------------------


def _response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The output JSON Schema asked for by ``response_format``: an OpenAI-style dict, or a pydantic
    model / TypedDict / JSON Schema given directly."""
    if isinstance(response_format, type) or (response_format is not None and not isinstance(response_format, dict)):
        return convert_to_json_schema(response_format)
    return response_format_schema(response_format)


def _usage_metadata(usage: Usage) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens),
    )


def _retryable(exc: BaseException) -> bool:
    """Whether another attempt could succeed: not for bad input (ValueError/TypeError:
    context overflow, unsupported schema...) nor a server's 4xx verdict on the request
    (except 408 timeout, 409 conflict and 429 rate limit)."""
    if isinstance(exc, (ValueError, TypeError, NotImplementedError)):
        return False
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429):
        return False
    return True


@dataclasses.dataclass
class _Turn:
    """Everything one model call needs: the plan, the sampling params and the LLM."""

    plan: Any  # agentrt.prompting.PromptPlan
    params: GenerationParams
    llm: LLM
    model_name: str


# --------------------------------------------------------------------------------------
# The chat model
# --------------------------------------------------------------------------------------


class ChatAgentRT(BaseChatModel):
    """A LangChain chat model on agentrt's engine, with grammar-constrained tool calls.

    Use it where you would use ``ChatOpenAI``::

        llm = ChatAgentRT()                        # the embedded SmolLM2-135M, in-process
        llm = ChatAgentRT(model="/models/qwen2")    # an HF folder / .safetensors / .gguf
        llm = ChatAgentRT(base_url="http://host:8000/v1", model="served-name")  # a server
        llm.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls

    Tool-call arguments and structured outputs are constrained by a grammar compiled
    from their JSON Schema, so they always parse and validate, unless cut off by
    ``max_tokens``: then ``finish_reason`` is "length" and the reason is given in
    ``invalid_tool_calls`` (invoke) or ``response_metadata["parse_error"]`` (stream).
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = None
    """In-process: a model path (HF folder, .safetensors or .gguf), None = embedded model.
    With ``base_url``: the model name the server serves."""
    base_url: str | None = Field(default_factory=lambda: os.environ.get("AGENTRT_BASE_URL"))
    """An agentrt or OpenAI-compatible server (``.../v1``); None = run in-process."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("AGENTRT_API_KEY", default=None))
    """Bearer key for ``base_url`` (default: env AGENTRT_API_KEY)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy (deterministic)."""
    max_tokens: int | None = None
    """Most tokens to generate per call (None = 512)."""
    top_p: float = 1.0
    stop: list[str] | None = None
    """Stop strings for free-text answers (never applied inside constrained JSON, which a
    stop string would cut into invalid JSON)."""
    timeout: float | None = None
    """Seconds one model call may take before it is cancelled (then retried)."""
    max_retries: int = 2
    """Retries after a failed or timed-out call (bad input is never retried)."""
    streaming: bool = False
    """When True, ``invoke`` streams internally (callbacks see every token)."""
    seed: int | None = None
    parallel_tool_calls: bool = True
    """Whether one turn may hold several tool calls (overridable in ``bind_tools``)."""
    llm: Any = Field(default=None, exclude=True)
    """Escape hatch: any `agentrt.llm.LLM` (e.g. ScriptedLLM) to use instead of building one."""

    _remote: Any = PrivateAttr(default=None)

    # -- identity ------------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "agentrt"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self._model_name(),
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def _model_name(self, override: str | None = None) -> str:
        """The model's name without loading it (for tracing params)."""
        if override:
            return override
        if self.llm is not None:
            return str(getattr(self.llm, "model_name", type(self.llm).__name__))
        if self.model:
            return self.model if self.base_url else os.path.basename(os.path.normpath(self.model))
        return DEFAULT_MODEL_NAME

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "agentrt"
        params["ls_model_name"] = self._model_name(kwargs.get("model") if isinstance(kwargs.get("model"), str) else None)
        if self.max_tokens is not None and "ls_max_tokens" not in params:
            params["ls_max_tokens"] = self.max_tokens
        if (stop or self.stop) and "ls_stop" not in params:
            params["ls_stop"] = stop or self.stop
        return params

    # -- which LLM -----------------------------------------------------------------------

    def _resolve_llm(self, model_override: str | None = None) -> LLM:
        """The LLM this call goes to: ``llm=``, a server client, or the shared LocalLLM."""
        if self.llm is not None:
            if model_override and model_override != getattr(self.llm, "model_name", None):
                raise ValueError(
                    f"model={model_override!r} cannot be served: this ChatAgentRT was given llm= "
                    f"({type(self.llm).__name__}), which serves one model; build one without llm="
                )
            return self.llm
        if self.base_url:
            if model_override and model_override != self.model:
                return self._make_remote(model_override)
            if self._remote is None:
                self._remote = self._make_remote(self.model)
            return self._remote
        return shared_local_llm(model_override or self.model)

    def _make_remote(self, model: str | None) -> LLM:
        from agentrt.remote import RemoteLLM

        key = self.api_key.get_secret_value() if self.api_key is not None else None
        # Retries and timeouts are applied here (one policy for every backend), so the
        # client itself must not retry too.
        extra = {"timeout": self.timeout} if self.timeout is not None else {}
        return RemoteLLM(base_url=self.base_url, model=model, api_key=key, max_retries=0, **extra)

    # -- building a turn -----------------------------------------------------------------

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Turn:
        known = {"tools", "tool_choice", "parallel_tool_calls", "response_format", "model",
                 "temperature", "max_tokens", "top_p", "seed", "stream"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"ChatAgentRT got unexpected call options {unknown}; supported: {sorted(known)}")
        tools = kwargs.get("tools") or []
        specs = tool_specs(tools)
        choice = normalize_tool_choice(kwargs.get("tool_choice"), [s.name for s in specs], "bound tools") or "auto"
        parallel = kwargs.get("parallel_tool_calls")
        parallel = self.parallel_tool_calls if parallel is None else bool(parallel)
        output_schema = _response_format_schema(kwargs.get("response_format"))
        plan = plan_request(to_agentrt_messages(messages), specs, choice, parallel, output_schema)
        stops = list(stop if stop is not None else (self.stop or []))
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        params = GenerationParams(
            max_tokens=512 if max_tokens is None else int(max_tokens),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            seed=kwargs.get("seed", self.seed),
            # A stop string inside constrained JSON would cut it into invalid JSON.
            stop=stops if plan.mode == "text" else [],
        )
        model_override = kwargs.get("model")
        llm = self._resolve_llm(model_override)
        # A per-call model is reported by the name the caller asked for it by.
        name = model_override or getattr(llm, "model_name", "") or self._model_name()
        return _Turn(plan, params, llm, str(name))

    async def _aprepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Turn:
        """`_prepare` off the event loop: the first call of a process loads the model
        (seconds), which must not stall other requests sharing the loop."""
        if self.llm is None and not self.base_url and _model_key(kwargs.get("model") or self.model) not in _LOCAL_LLMS:
            return await asyncio.to_thread(self._prepare, messages, stop, kwargs)
        return self._prepare(messages, stop, kwargs)

    # -- retries and timeouts ------------------------------------------------------------

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` with the per-call timeout, retrying transient failures
        (see `_retryable`) with exponential back-off."""
        attempt = 0
        while True:
            try:
                if self.timeout is None:
                    return await call()
                return await asyncio.wait_for(call(), self.timeout)
            except Exception as exc:  # timeouts, connection errors, a server's 5xx ...
                if not _retryable(exc) or attempt >= self.max_retries:
                    raise
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
                attempt += 1

    # -- results -------------------------------------------------------------------------

    def _response_metadata(self, turn: _Turn, completion: Completion, has_calls: bool) -> dict[str, Any]:
        finish = "tool_calls" if has_calls and completion.finish_reason == "stop" else completion.finish_reason
        return {
            "model_name": turn.model_name,
            "finish_reason": finish,
            "ttft_s": completion.ttft_s,
            "decode_s": completion.decode_s,
            "forced_tokens": completion.forced_tokens,
            "draft_tokens": completion.draft_tokens,
            "closed_by_budget": completion.closed_by_budget,
        }

    def _to_ai_message(self, turn: _Turn, completion: Completion) -> AIMessage:
        from agentrt.prompting import parse_turn

        text = completion.text
        content: str = text
        calls: list[Any] = []
        invalid: list[Any] = []
        if turn.plan.mode == "tools" and completion.finish_reason == "length":
            content, calls, invalid = self._salvage_cut_turn(turn, completion)
        elif turn.plan.mode == "tools":
            try:
                parsed = parse_turn(text, turn.plan)
            except ValueError as exc:  # cannot happen under the grammar; an LLM without one
                reason = self._cut_reason(exc, turn, completion)
                invalid.append(invalid_tool_call(name=None, args=text, id=None, error=reason))
                content = ""
            else:
                content = parsed.content or ""
                calls = [tool_call(name=c.name, args=c.arguments, id=c.id) for c in parsed.tool_calls]
        return AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_usage_metadata(completion.usage),
            response_metadata=self._response_metadata(turn, completion, bool(calls)),
        )

    def _salvage_cut_turn(self, turn: _Turn, completion: Completion) -> tuple[str, list[Any], list[Any]]:
        """A tools-mode output cut by max_tokens: keep what is complete, as streaming does
        (the calls whose arguments closed, the answer text so far), and report the cut as
        an invalid tool call naming the fix."""
        cut = salvage_cut_turn(completion.text)
        calls = [tool_call(name=c.name, args=c.arguments, id=c.id) for c in cut.tool_calls]
        if cut.error is None:  # the JSON closed exactly at the limit
            return cut.content or "", calls, []
        reason = self._cut_reason(cut.error, turn, completion)
        return cut.content or "", calls, [invalid_tool_call(name=None, args=completion.text, id=None, error=reason)]

    # -- BaseChatModel hooks -------------------------------------------------------------

    async def _acomplete(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> ChatResult:
        turn = await self._aprepare(messages, stop, kwargs)
        completion = await self._with_retries(
            lambda: turn.llm.complete(turn.plan.chat_messages, json_schema=turn.plan.json_schema, params=turn.params)
        )
        message = self._to_ai_message(turn, completion)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": turn.model_name})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _LOOP.run(self._acomplete(messages, stop, kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await self._acomplete(messages, stop, kwargs)

    async def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The streamed turn as LangChain chunks; the last one carries usage and metadata."""
        kwargs = {k: v for k, v in kwargs.items() if k != "stream"}
        turn = await self._aprepare(messages, stop, kwargs)
        parser = ToolCallStreamParser(turn.plan.mode)
        completion: Completion | None = None
        attempt = 0
        while True:
            started = False
            try:
                agen = turn.llm.stream(turn.plan.chat_messages, json_schema=turn.plan.json_schema, params=turn.params)
                try:
                    while True:
                        try:
                            if self.timeout is None:
                                chunk = await agen.__anext__()
                            else:
                                chunk = await asyncio.wait_for(agen.__anext__(), self.timeout)
                        except StopAsyncIteration:
                            break
                        if chunk.delta:
                            started = True
                            message = _events_to_chunk(parser.feed(chunk.delta))
                            if message is not None:
                                yield ChatGenerationChunk(message=message)
                        if chunk.completion is not None:
                            completion = chunk.completion
                finally:
                    aclose = getattr(agen, "aclose", None)
                    if aclose is not None:
                        await aclose()
                break
            except Exception as exc:
                # Retry only before anything reached the caller: a restart would repeat text.
                if started or not _retryable(exc) or attempt >= self.max_retries:
                    raise
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
                attempt += 1
        if completion is None:
            raise RuntimeError("the LLM stream ended without a final completion")
        metadata: dict[str, Any] = {}
        if turn.plan.mode == "tools":
            try:
                last = _events_to_chunk(parser.finish())
            except ValueError as exc:
                # Chunks already sent cannot be taken back (as with any stream cut by
                # length); LangChain rebuilds tool calls from the chunks, so the reason
                # goes into response_metadata["parse_error"] next to finish_reason.
                last = None
                metadata["parse_error"] = self._cut_reason(exc, turn, completion)
            if last is not None:
                yield ChatGenerationChunk(message=last)
        has_calls = turn.plan.mode == "tools" and bool(parser.tool_calls)
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=_usage_metadata(completion.usage),
                response_metadata={**self._response_metadata(turn, completion, has_calls), **metadata},
                chunk_position="last",
            )
        )

    @staticmethod
    def _cut_reason(exc: Exception | str, turn: _Turn, completion: Completion) -> str:
        reason = f"the model's output did not parse ({exc}); finish_reason={completion.finish_reason!r}"
        if completion.finish_reason == "length":
            reason += f": raise max_tokens (was {turn.params.max_tokens})"
        return reason

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in _LOOP.iterate(self._chunks(messages, stop, kwargs)):
            if run_manager is not None and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in self._chunks(messages, stop, kwargs):
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # -- tools and structured output -----------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (pydantic models, JSON-schema / OpenAI tool dicts, functions, BaseTools).

        ``tool_choice``: None/"auto" (call or answer), "any"/"required"/True (must call),
        "none" (must answer), or a bound tool's name (must call that tool). The calls are
        grammar-constrained to the tools' argument schemas.
        """
        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        names = [f["function"]["name"] for f in formatted]
        choice = normalize_tool_choice(tool_choice, names, "bound tools")
        if choice not in (None, "auto", "required", "none") and not formatted:
            raise ValueError("tool_choice names a tool but no tools were bound")
        bind_kwargs: dict[str, Any] = {"tools": formatted, **kwargs}
        if choice is not None:
            bind_kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            bind_kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(**bind_kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable returning outputs of ``schema`` (pydantic model, TypedDict, JSON Schema).

        ``method``: "json_schema" (the whole output is the object, grammar-constrained),
        "function_calling" (a forced call of a tool named after the schema) or "json_mode"
        (a JSON object; constrained to ``schema`` when one is given, else any object).
        The output is valid by construction in every method (unless cut by max_tokens).
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', not {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema (a pydantic model, TypedDict or JSON Schema dict)")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format: dict[str, Any] | None = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        output_parser: Runnable[Any, Any]
        if method == "function_calling":
            assert schema is not None
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=name, parallel_tool_calls=False, strict=strict,
                ls_structured_output_format=ls_format,
            )
            if is_pydantic:
                output_parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                output_parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        else:
            if schema is None:
                response_format: dict[str, Any] = {"type": "json_object"}
                ls_format = None  # LangChain's tracing wants a schema here
            else:
                json_schema = _schema_for_grammar(schema)
                response_format = {
                    "type": "json_schema",
                    "json_schema": {"name": json_schema.get("title", "output"), "schema": json_schema},
                }
            bind_kwargs: dict[str, Any] = {"response_format": response_format}
            if ls_format is not None:
                bind_kwargs["ls_structured_output_format"] = ls_format
            llm = self.bind(**bind_kwargs)
            if is_pydantic:
                output_parser = PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            else:
                output_parser = JsonOutputParser()
        if include_raw:
            parser_assign = RunnablePassthrough.assign(
                parsed=itemgetter("raw") | output_parser, parsing_error=lambda _: None
            )
            parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
            parser_with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
            return RunnableMap(raw=llm) | parser_with_fallback
        return llm | output_parser


def _schema_for_grammar(schema: dict[str, Any] | type) -> dict[str, Any]:
    """A JSON Schema of ``schema``: pydantic v2 models keep their own (with $defs);
    TypedDicts, pydantic v1 models and dicts go through LangChain's converter."""
    if isinstance(schema, dict):
        if "function" in schema and "parameters" in schema.get("function", {}):
            return convert_to_json_schema(schema)  # an OpenAI tool dict
        return schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    return convert_to_json_schema(schema)


def _events_to_chunk(events: list[Any]) -> AIMessageChunk | None:
    """Stream-parser events -> one AIMessageChunk (content + tool_call_chunks), or None.

    One delta can hold several events of the same call (forced tokens arrive in bulk):
    they become a single tool_call_chunk per call index, because LangChain merges chunks
    by index only across messages, not within one.
    """
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for ev in events:
        if isinstance(ev, ContentDelta):
            text.append(ev.text)
        elif isinstance(ev, (ToolCallStart, ToolCallArgsDelta)):
            entry = calls.setdefault(ev.index, {"name": None, "id": None, "args": ""})
            if isinstance(ev, ToolCallStart):
                entry["name"], entry["id"] = ev.name, ev.id
            else:
                entry["args"] += ev.json_fragment
    if not text and not calls:
        return None
    chunks = [tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=i) for i, c in calls.items()]
    return AIMessageChunk(content="".join(text), tool_call_chunks=chunks)


# --------------------------------------------------------------------------------------
# Tool interop: agentrt registry tools <-> LangChain tools
# --------------------------------------------------------------------------------------


def to_langchain_tool(tool: Any) -> BaseTool:
    """An agentrt registry `Tool` as a LangChain `StructuredTool`.

    The LangChain tool's ``args_schema`` is the agentrt tool's own JSON Schema, and calls
    go through a one-tool `ToolRegistry`, so arguments are validated, context injected
    and timeouts applied exactly as in agentrt. A failing call raises `ToolException`,
    which LangChain turns into a ``ToolMessage(status="error")`` carrying the message.
    """
    registry = ToolRegistry()
    registry.register(tool)
    counter = {"n": 0}

    async def _acall(**kwargs: Any) -> str:
        counter["n"] += 1
        result = await registry.call(ToolCall(id=f"lc_{counter['n']}", name=tool.name, arguments=kwargs))
        if result.is_error:
            raise ToolException(result.content)
        return result.content

    def _call(**kwargs: Any) -> str:
        return _LOOP.run(_acall(**kwargs))

    return StructuredTool(
        name=tool.name,
        description=tool.description or tool.name,
        # A dict schema: LangChain passes the arguments through untouched and the
        # registry validates them (aliases, nested models and all) as it always does.
        args_schema=tool.spec.parameters,
        func=_call,
        coroutine=_acall,
        handle_tool_error=True,
    )


@dataclasses.dataclass(eq=False)
class LangChainTool(Tool):
    """A registry `Tool` whose call is a LangChain tool's ``ainvoke`` (see `from_langchain_tool`)."""

    lc_tool: Any = None

    async def invoke(self, arguments: dict[str, Any] | None, context: Any = None) -> Any:
        arguments = arguments or {}
        self.parse_arguments(arguments)  # the same validation as every agentrt tool
        out = await self.lc_tool.ainvoke(arguments)
        if isinstance(out, ToolMessage):
            if out.status == "error":
                raise ToolException(_content_text(out.content, f"{self.name} result"))
            out = out.content
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)


def from_langchain_tool(lc_tool: BaseTool, *, timeout_s: float | None = None) -> LangChainTool:
    """A LangChain tool as an agentrt `Tool`, registrable in a `ToolRegistry`.

    The model sees the tool's argument schema as ``bind_tools`` would send it; the
    registry validates arguments against it, then the call runs ``lc_tool.ainvoke`` with
    the arguments as given and returns its output as text (non-strings as JSON).
    """
    spec_fn = convert_to_openai_tool(lc_tool)["function"]
    parameters = spec_fn.get("parameters") or {"type": "object", "properties": {}}
    description = spec_fn.get("description") or lc_tool.description or ""
    args_model = lc_tool.tool_call_schema
    if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
        # A dict or pydantic-v1 schema: the Tool's JSON Schema validator does the checking.
        args_model = create_model(f"{lc_tool.name}_args", __config__=ConfigDict(extra="allow"))

    async def fn(**kwargs: Any) -> Any:
        return await lc_tool.ainvoke(kwargs)

    fn.__name__ = lc_tool.name
    fn.__doc__ = description
    return LangChainTool(
        name=lc_tool.name,
        description=description,
        spec=ToolSpec(name=lc_tool.name, description=description, parameters=parameters),
        args_model=args_model,
        fn=fn,
        timeout_s=timeout_s,
        is_async=True,
        lc_tool=lc_tool,
    )
