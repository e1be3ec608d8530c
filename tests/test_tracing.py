"""OpenTelemetry traces (agentrt.tracing): the span tree and attributes of a run, nothing when off,
the server continuing a client's trace, and a collector that is down."""
from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from agentrt import tracing
from agentrt.planner import Agent
from agentrt.registry import ToolRegistry
from agentrt.server import create_app
from agentrt.testing import ScriptedLLM
from agentrt.types import Usage

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="the OpenTelemetry SDK (agentrt[otel])")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def registry() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @reg.tool
    def explode(reason: str) -> str:
        """Always fails."""
        raise RuntimeError(reason)

    return reg


def two_steps(**kw) -> ScriptedLLM:
    """Step 1 calls add (and explode), step 2 answers."""
    return ScriptedLLM([{"calls": [{"tool": "add", "arguments": {"a": 2, "b": 3}},
                                   {"tool": "explode", "arguments": {"reason": "no"}}]},
                        {"answer": "5"}], usage=Usage(prompt_tokens=40, completion_tokens=8, cached_tokens=32), **kw)


@pytest.fixture
def exporter():
    """agentrt's spans go to an in-memory exporter for the test (OpenTelemetry's global provider is
    left alone)."""
    memory = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure_tracing(provider=provider)
    yield memory
    tracing.shutdown_tracing()


def by_name(spans) -> dict:
    return {s.name: s for s in spans}


def parent_of(span):
    return span.parent.span_id if span.parent is not None else None


async def test_a_two_step_run_makes_a_span_tree(exporter):
    result = await Agent(two_steps(), registry(), name="calc").run("2+3?")
    assert result.status == "completed" and result.answer == "5"
    spans = exporter.get_finished_spans()
    named = by_name(spans)
    assert sorted(named) == sorted(["invoke_agent calc", "agentrt.step 1", "agentrt.step 2", "chat scripted",
                                    "execute_tool add", "execute_tool explode"]) and len(spans) == 7
    run, step1, step2 = named["invoke_agent calc"], named["agentrt.step 1"], named["agentrt.step 2"]
    chats = [s for s in spans if s.name == "chat scripted"]
    # the tree: run > step > (chat, execute_tool), all one trace
    assert run.parent is None
    assert parent_of(step1) == parent_of(step2) == run.context.span_id
    assert sorted(parent_of(c) for c in chats) == sorted([step1.context.span_id, step2.context.span_id])
    for name in ("execute_tool add", "execute_tool explode"):
        assert parent_of(named[name]) == step1.context.span_id
    assert {s.context.trace_id for s in spans} == {run.context.trace_id}

    assert run.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert run.attributes["gen_ai.agent.name"] == "calc"
    assert run.attributes["agentrt.run.status"] == "completed"
    assert run.attributes["agentrt.run.steps"] == 2
    assert run.attributes["agentrt.run.id"] == result.run_id
    assert run.attributes["gen_ai.usage.input_tokens"] == 80
    assert run.attributes["agentrt.usage.cached_tokens"] == 64
    assert run.status.status_code == StatusCode.UNSET
    assert step1.attributes["agentrt.step.index"] == 1 and step1.attributes["agentrt.step.tool_calls"] == 2
    assert step2.attributes["agentrt.step.final"] is True

    chat = next(c for c in chats if parent_of(c) == step1.context.span_id)
    assert chat.kind == SpanKind.CLIENT
    assert dict(chat.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "agentrt", "gen_ai.system": "agentrt",
        "gen_ai.request.model": "scripted", "gen_ai.request.max_tokens": 256, "gen_ai.request.temperature": 0.0,
        "gen_ai.output.type": "json", "gen_ai.response.model": "scripted", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 8, "agentrt.usage.cached_tokens": 32,
        "agentrt.ttft_s": 0.0, "agentrt.decode_s": 0.0, "agentrt.forced_tokens": 0, "agentrt.draft_tokens": 0,
        "agentrt.closed_by_budget": False,
    }

    add, explode = named["execute_tool add"], named["execute_tool explode"]
    call_ids = [c.id for c in result.steps[0].calls]
    assert add.attributes["gen_ai.operation.name"] == "execute_tool"
    assert add.attributes["gen_ai.tool.name"] == "add" and add.attributes["gen_ai.tool.type"] == "function"
    assert [add.attributes["gen_ai.tool.call.id"], explode.attributes["gen_ai.tool.call.id"]] == call_ids
    assert add.status.status_code == StatusCode.UNSET
    assert explode.status.status_code == StatusCode.ERROR and explode.attributes["error.type"] == "RuntimeError"


async def test_a_failed_run_marks_its_spans(exporter):
    llm = ScriptedLLM([RuntimeError("engine down")])
    result = await Agent(llm, registry()).run("2+3?")
    assert result.status == "error"
    named = by_name(exporter.get_finished_spans())
    assert set(named) == {"invoke_agent agent", "agentrt.step 1", "chat scripted"}
    run, chat = named["invoke_agent agent"], named["chat scripted"]
    assert run.status.status_code == StatusCode.ERROR and run.attributes["error.type"] == "error"
    assert chat.status.status_code == StatusCode.ERROR and chat.attributes["error.type"] == "error"
    assert "engine down" in chat.status.description


async def test_an_abandoned_run_still_ends_its_spans(exporter):
    events = Agent(two_steps(), registry()).astream("2+3?")
    async for _ in events:
        break  # the consumer leaves after the first event
    await events.aclose()
    named = by_name(exporter.get_finished_spans())
    assert named["invoke_agent agent"].attributes["agentrt.run.status"] == "abandoned"


async def test_with_tracing_off_no_span_is_made(monkeypatch):
    memory = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert not tracing.tracing_enabled()  # nothing configured here nor globally
    # not configured: a run must not even ask for a tracer
    monkeypatch.setattr(tracing, "get_tracer", lambda: pytest.fail("a tracer was asked for with tracing off"))
    result = await Agent(two_steps(), registry()).run("2+3?")
    assert result.status == "completed"
    assert memory.get_finished_spans() == ()


def test_configure_does_nothing_without_an_endpoint(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
                "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    assert tracing.configure_tracing() is False
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.configure_tracing() is False
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure_tracing("http://127.0.0.1:4318") is False
    assert not tracing.tracing_enabled()


def test_the_endpoint_gets_the_traces_path():
    assert tracing._traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert tracing._traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing._traces_url("https://c/otel/v1/traces") == "https://c/otel/v1/traces"
    with pytest.raises(ValueError, match="http"):
        tracing._traces_url("127.0.0.1:4318")


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_continues_the_clients_trace(exporter, stream):
    app = create_app(llm=two_steps(), registry=registry())
    with TestClient(app) as client:
        r = client.post("/agent/run", json={"task": "2+3?", "stream": stream},
                        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert r.status_code == 200 and '"completed"' in r.text
    named = by_name(exporter.get_finished_spans())
    request, run = named["POST /agent/run"], named["invoke_agent agent"]
    assert request.kind == SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == TRACE_ID == format(run.context.trace_id, "032x")
    assert format(parent_of(request), "016x") == PARENT_ID
    assert parent_of(run) == request.context.span_id
    assert request.attributes["http.request.method"] == "POST"
    assert request.attributes["url.path"] == "/agent/run" and request.attributes["http.route"] == "/agent/run"
    assert request.attributes["http.response.status_code"] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_the_chat_api_model_call_is_under_the_request_span(exporter, stream):
    app = create_app(llm=ScriptedLLM(["hello"]), registry=registry())
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                                      "stream": stream})
    assert r.status_code == 200
    named = by_name(exporter.get_finished_spans())
    request, chat = named["POST /v1/chat/completions"], named["chat scripted"]
    assert parent_of(chat) == request.context.span_id
    assert chat.attributes["gen_ai.usage.output_tokens"] >= 1
    assert chat.attributes["gen_ai.response.finish_reasons"] == ("stop",)


@pytest.fixture(params=["closed", "hung"])
def down_collector(request):
    """The URL of a collector that is down: a closed port, or one that takes connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if request.param == "hung":
            s.listen(8)
            yield f"http://127.0.0.1:{s.getsockname()[1]}"
            return
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


async def test_a_collector_that_is_down_neither_fails_nor_slows_a_run(monkeypatch, down_collector):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "1")  # export (and fail) while the run goes on
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # keeps the flush at the end short
    assert tracing.configure_tracing(down_collector, set_global=False)
    try:
        assert tracing.configure_tracing("http://127.0.0.1:1", set_global=False)  # idempotent: the first stays
        result = await Agent(two_steps(delay_s=0.05), registry()).run("2+3?")
        assert result.status == "completed" and result.answer == "5"
        # a run that waited on an export would take the export's timeout (1 s) or more
        assert result.duration_s < 1.0
    finally:
        tracing.shutdown_tracing()
    assert not tracing.tracing_enabled()
