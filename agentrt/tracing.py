"""OpenTelemetry traces: one span per agent run, per step, per model call and per tool call.

Spans follow the OpenTelemetry GenAI semantic conventions (``invoke_agent {agent}``,
``chat {model}``, ``execute_tool {tool}`` with the ``gen_ai.*`` attributes), nested as
run > step > chat / execute_tool, plus what this runtime measures under ``agentrt.*``
(cached tokens, TTFT, forced tokens, engine queue time).

Tracing is off unless configured: only the OpenTelemetry *API* is a dependency, and until a
tracer provider is set up nothing is created at all (`tracing_enabled` is checked first, and a
span that is not recording gets no attributes). `configure_tracing` sets up the SDK with an
OTLP/HTTP exporter (``pip install 'agentrt[otel]'``) from an endpoint or the standard
``OTEL_*`` environment variables; spans are exported in a background thread with a short
timeout, so a collector that is down never slows or fails a run.

Spans that outlive a ``yield`` of the planner's event generator (the run and its steps) are
never made "current": their children name them as parent explicitly, so no context is attached
in one task and detached in another. The model call and each tool call are made current for
their duration (within one coroutine), so instrumentation below them (an HTTP client) joins
the trace.
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator
from urllib.parse import urlparse

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode

if TYPE_CHECKING:
    from agentrt.protocol import Completion, CompletionChunk, GenerationParams
    from agentrt.types import RunResult, Step, ToolCall, ToolResult

TRACER_NAME = "agentrt"
PROVIDER_NAME = "agentrt"  # gen_ai.provider.name: the runtime that serves the model
DEFAULT_EXPORT_TIMEOUT_S = 3.0  # per export, retries included (OTel's default is 10 s)
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_TIMEOUT_VARS = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")

# The provider agentrt's spans go to when set here (configure_tracing); None = OpenTelemetry's global one.
_provider: Any = None
_owned: Any = None  # the SDK provider configure_tracing built from an endpoint (shut down by shutdown_tracing)


# ---------------------------------------------------------------- set-up


def get_tracer() -> trace.Tracer:
    """agentrt's tracer: from the provider `configure_tracing` set, else OpenTelemetry's global
    provider (a no-op one unless the application configured the SDK)."""
    if _provider is not None:
        return _provider.get_tracer(TRACER_NAME)
    return trace.get_tracer(TRACER_NAME)


def tracing_enabled() -> bool:
    """Whether spans would be recorded anywhere: a provider was configured here or globally."""
    if _provider is not None:
        return True
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def configure_tracing(
    endpoint: str | None = None,
    service_name: str = "agentrt",
    *,
    provider: Any = None,
    set_global: bool = True,
) -> bool:
    """Turn tracing on; returns whether it is on.

    ``endpoint``: an OTLP/HTTP collector, e.g. ``http://127.0.0.1:4318`` (``/v1/traces`` is added
    when the URL has no path). None: only if the standard environment variables ask for it
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, or
    ``OTEL_TRACES_EXPORTER`` naming ``otlp`` or ``console``; never when ``OTEL_SDK_DISABLED=true``
    or ``OTEL_TRACES_EXPORTER=none``). The SDK provider built then exports in batches from a
    background thread (``OTEL_BSP_*`` apply) with a short timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``
    overrides it), and with ``set_global`` also becomes OpenTelemetry's global provider so
    other instrumentation joins the same traces (the global can be set once per process).

    Idempotent: once an endpoint or the environment configured tracing, later calls change
    nothing and return True. ``provider``: use this `TracerProvider` for agentrt's spans
    instead (tests: an in-memory exporter), replacing any earlier one; nothing global changes.

    Raises ImportError naming the ``agentrt[otel]`` extra when the SDK is needed and missing.
    """
    global _provider, _owned
    if provider is not None:
        _provider = provider
        return True
    if _owned is not None:
        return True
    exporters = _wanted_exporters(endpoint)
    if not exporters:
        return False
    built = _build_provider(endpoint, service_name, exporters)
    if set_global:
        trace.set_tracer_provider(built)  # a no-op (with a warning) if the application set one first
    _provider = _owned = built
    return True


def shutdown_tracing() -> None:
    """Export what is pending and stop the provider `configure_tracing` built; agentrt's spans go
    to OpenTelemetry's global provider again (which stays the stopped one if ``set_global`` made
    it so: OpenTelemetry cannot unset it). The SDK also does this at interpreter exit."""
    global _provider, _owned
    owned, _owned = _owned, None
    _provider = None
    if owned is not None:
        owned.shutdown()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _wanted_exporters(endpoint: str | None) -> list[str]:
    """Which exporters the arguments and ``OTEL_*`` variables ask for ("otlp", "console"); [] = off."""
    if _env_true("OTEL_SDK_DISABLED"):
        return []
    if endpoint:
        return ["otlp"]
    names = {n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()}
    if "none" in names:
        return []
    wanted = []
    # an endpoint in the environment is the usual way to opt in; OTEL_TRACES_EXPORTER=otlp alone
    # means the default endpoint (http://localhost:4318)
    if "otlp" in names or (not names and any(os.environ.get(v) for v in _ENDPOINT_VARS)):
        wanted.append("otlp")
    if "console" in names:
        wanted.append("console")
    return wanted


def _traces_url(endpoint: str) -> str:
    """``http://host:4318`` -> ``http://host:4318/v1/traces``; a URL with a path is kept as is."""
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"the OTLP endpoint must be an http(s) URL like 'http://127.0.0.1:4318', got {endpoint!r}")
    return endpoint.rstrip("/") + "/v1/traces" if parsed.path in ("", "/") else endpoint


def _build_provider(endpoint: str | None, service_name: str, exporters: list[str]) -> Any:
    """An SDK TracerProvider with a batch processor per exporter."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ImportError("tracing needs the OpenTelemetry SDK: pip install 'agentrt[otel]'") from exc
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default name
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        exporter = _otlp_exporter(endpoint) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter(endpoint: str | None) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError("exporting traces needs the OTLP exporter: pip install 'agentrt[otel]'") from exc
    # a collector that is down must not hold up exports (nor the exit, which flushes) for long
    timeout = None if any(os.environ.get(v) for v in _TIMEOUT_VARS) else DEFAULT_EXPORT_TIMEOUT_S
    return OTLPSpanExporter(endpoint=_traces_url(endpoint) if endpoint else None, timeout=timeout)


# ---------------------------------------------------------------- attributes


def _fail(span: Span, error_type: str, message: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(StatusCode.ERROR, message)


def _error_type(exc: BaseException) -> str:
    # an exception may name its own low-cardinality kind (the planner's stops: "cancelled", ...)
    return getattr(exc, "error_type", None) or type(exc).__qualname__


def _chat_name(model: str) -> str:
    return f"chat {model}" if model else "chat"


def _chat_attributes(model: str, params: GenerationParams | None, json_schema: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.system": PROVIDER_NAME,  # the older name of gen_ai.provider.name
        "gen_ai.request.model": model,
    }
    if params is not None:
        attrs["gen_ai.request.max_tokens"] = params.max_tokens
        attrs["gen_ai.request.temperature"] = params.temperature
        if params.top_p != 1.0:
            attrs["gen_ai.request.top_p"] = params.top_p
        if params.top_k:
            attrs["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attrs["gen_ai.request.seed"] = params.seed
    if json_schema is not None:
        attrs["gen_ai.output.type"] = "json"
    return attrs


def _record_completion(span: Span, model: str, completion: Completion) -> None:
    usage = completion.usage
    span.set_attributes({
        "gen_ai.response.model": model,
        "gen_ai.response.finish_reasons": (completion.finish_reason,),
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "agentrt.usage.cached_tokens": usage.cached_tokens,
        "agentrt.ttft_s": completion.ttft_s,
        "agentrt.decode_s": completion.decode_s,
        "agentrt.forced_tokens": completion.forced_tokens,
        "agentrt.draft_tokens": completion.draft_tokens,
        "agentrt.closed_by_budget": completion.closed_by_budget,
    })
    # known only to some LLMs (the local engine's scheduler queue; speculative decoding)
    for attr, field in (("agentrt.queue_time_s", "queue_s"), ("agentrt.speculative_tokens", "speculative_tokens")):
        value = getattr(completion, field, None)
        if value is not None:
            span.set_attribute(attr, value)


def _tool_error_type(content: str) -> str:
    """The registry writes failures as ``"<ErrorType>: <message>"``."""
    head = content.split(":", 1)[0]
    return head if head.isidentifier() else "tool_error"


# ---------------------------------------------------------------- spans of a run


class _Current:
    """A span ended with a ``with`` block (an exception leaving the block marks it failed) and made
    current for it inside one coroutine; with ``attach=False`` (a block that spans a generator's
    ``yield``) it is current only within `active` blocks, which must not span one."""

    def __init__(self, span: Span, model: str = "", attach: bool = True):
        self.span, self.model, self.attach = span, model, attach
        self._token: Any = None

    def __enter__(self) -> _Current:
        if self.attach:
            self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            _fail(self.span, _error_type(exc), str(exc) or None)
        if self._token is not None:
            otel_context.detach(self._token)
        self.span.end()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The span is current inside this block (e.g. while awaiting the model's next chunk)."""
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def completion(self, completion: Completion) -> None:
        """A model call's outcome: usage, timings, finish reason."""
        _record_completion(self.span, self.model, completion)

    def result(self, result: ToolResult) -> None:
        """A tool call's outcome: an error result marks the span failed."""
        self.span.set_attribute("agentrt.tool.duration_s", result.duration_s)
        if result.is_error:
            _fail(self.span, _tool_error_type(result.content))


class _Off:
    """What `RunTrace` hands out when tracing is off: does nothing."""

    def __enter__(self) -> _Off:
        return self

    def active(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def __exit__(self, *exc: object) -> None:
        return None

    def completion(self, completion: Completion) -> None:
        return None

    def result(self, result: ToolResult) -> None:
        return None


_OFF = _Off()


class RunTrace:
    """The spans of one agent run, driven by the planner at each phase.

    ``invoke_agent {name}`` starts here (a child of the current span, e.g. the server's request
    span); `start_step` / `end_step` bracket a step; `model_call` and `tool_call` are ``with``
    blocks around the model call and each tool call; `finish` records the result; `close` ends
    whatever is still open (a run abandoned by its consumer). With tracing off every method
    returns at once.
    """

    def __init__(self, agent_name: str, run_id: str, model: str, max_steps: int):
        self.run_span: Span | None = None
        self.step_span: Span | None = None
        self.model = model
        if not tracing_enabled():
            return
        span = get_tracer().start_span(f"invoke_agent {agent_name}", kind=SpanKind.INTERNAL)
        if not span.is_recording():  # sampled out: the children would be too
            span.end()
            return
        span.set_attributes({
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent_name,
            "gen_ai.provider.name": PROVIDER_NAME,
            "gen_ai.system": PROVIDER_NAME,
            "gen_ai.request.model": model,
            "agentrt.run.id": run_id,
            "agentrt.run.max_steps": max_steps,
        })
        self.run_span = span

    def _child(self, parent: Span | None, name: str, kind: SpanKind, attributes: dict[str, Any]) -> Span:
        return get_tracer().start_span(name, context=trace.set_span_in_context(parent), kind=kind,
                                       attributes=attributes)

    def start_step(self, index: int) -> None:
        """Step ``index`` (from 1) begins."""
        if self.run_span is None:
            return
        self.step_span = self._child(self.run_span, f"agentrt.step {index}", SpanKind.INTERNAL,
                                     {"agentrt.step.index": index})

    def end_step(self, step: Step) -> None:
        """The step is done (its record complete)."""
        span, self.step_span = self.step_span, None
        if span is None:
            return
        span.set_attributes({
            "agentrt.step.tool_calls": len(step.calls),
            "agentrt.step.tool_time_s": step.tool_time_s,
            "agentrt.step.final": step.answer is not None,
        })
        if step.error is not None:  # fed back to the model (or a refused repeat): the run goes on
            span.set_attribute("agentrt.step.error", step.error)
        span.end()

    def model_call(self, params: GenerationParams | None, json_schema: Any = None, *,
                   current: bool = True) -> _Current | _Off:
        """``with trace.model_call(params) as call: ...; call.completion(c)``: the ``chat`` span
        (``current=False``: current only inside ``call.active()`` blocks)."""
        if self.step_span is None:
            return _OFF
        span = self._child(self.step_span, _chat_name(self.model), SpanKind.CLIENT,
                           _chat_attributes(self.model, params, json_schema))
        return _Current(span, self.model, attach=current)

    def tool_call(self, call: ToolCall) -> _Current | _Off:
        """``with trace.tool_call(call) as t: ...; t.result(r)``: the ``execute_tool`` span (made
        current in the tool's own task, under the step span)."""
        if self.step_span is None:
            return _OFF
        span = self._child(self.step_span, f"execute_tool {call.name}", SpanKind.INTERNAL, {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
        })
        return _Current(span)

    def finish(self, result: RunResult) -> None:
        """The run ended with ``result``: status, steps and the summed usage. A run that failed
        (error, max_steps, budget_exceeded) is an error span, and so is a step it cut short."""
        span = self.run_span
        if span is None:
            return
        failed = result.status not in ("completed", "cancelled")
        if self.step_span is not None:
            if failed:
                _fail(self.step_span, result.status, result.error)
            self.step_span.end()
            self.step_span = None
        span.set_attributes({
            "agentrt.run.status": result.status,
            "agentrt.run.steps": len(result.steps),
            "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": result.usage.completion_tokens,
            "agentrt.usage.cached_tokens": result.usage.cached_tokens,
        })
        if failed:
            _fail(span, result.status, result.error)
        span.end()
        self.run_span = None

    def close(self) -> None:
        """End what is still open: the run was abandoned before it finished."""
        if self.step_span is not None:
            self.step_span.end()
            self.step_span = None
        if self.run_span is not None:
            self.run_span.set_attribute("agentrt.run.status", "abandoned")
            self.run_span.end()
            self.run_span = None


# ---------------------------------------------------------------- a model stream (the chat API)


def traced_stream(stream: AsyncIterator[CompletionChunk], model: str, params: GenerationParams | None = None,
                  json_schema: Any = None) -> AsyncIterator[CompletionChunk]:
    """``stream`` with a ``chat {model}`` span (a child of the current span) from now until it
    ends or is closed; ``stream`` itself when tracing is off."""
    if not tracing_enabled():
        return stream
    span = get_tracer().start_span(_chat_name(model), kind=SpanKind.CLIENT,
                                   attributes=_chat_attributes(model, params, json_schema))
    if not span.is_recording():
        span.end()
        return stream
    return _TracedStream(stream, span, model)


class _TracedStream:
    """An async iterator over a model stream that records its completion on a span and ends the
    span when the stream ends, fails or is closed (``aclose`` closes the stream, which aborts
    the generation, as closing the stream itself would)."""

    def __init__(self, stream: AsyncIterator[CompletionChunk], span: Span, model: str):
        self.stream, self.span, self.model = stream, span, model
        self.ended = False

    def __aiter__(self) -> _TracedStream:
        return self

    async def __anext__(self) -> CompletionChunk:
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except BaseException as exc:
            if not self.ended:
                _fail(self.span, _error_type(exc), str(exc) or None)
            self._end()
            raise
        if chunk.completion is not None and not self.ended:
            _record_completion(self.span, self.model, chunk.completion)
        return chunk

    async def aclose(self) -> None:
        try:
            aclose = getattr(self.stream, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.span.end()
