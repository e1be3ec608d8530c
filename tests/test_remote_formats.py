"""RemoteLLM's ``constrain`` modes against fake OpenAI-compatible servers on loopback: one that
behaves as llama-cpp-python 0.3.x's server (500 for ``json_schema``, honours ``json_object`` +
``schema``), one that constrains only through tools + tool_choice, and one that refuses every way."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentrt.llm import GenerationParams
from agentrt.planner import Agent
from agentrt.remote import ConstraintUnsupportedError, RemoteLLM
from agentrt.remote_formats import rejects_format, short_reason
from tests.helpers.server import live_server
from tests.test_server import make_registry

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
MESSAGES = [{"role": "user", "content": "seven?"}]

# llama-cpp-python's RouteErrorHandler turns the request's validation error into a 500 with this body
LLAMA_CPP_PY_REFUSAL = {"error": {
    "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
               "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
               "'ctx': {'expected': \"'text' or 'json_object'\"}}\n",
    "type": "internal_server_error", "param": None, "code": None}}


def request_mode(body: dict[str, Any]) -> str:
    """How a request asks for constrained output (the `constrain` mode that built it)."""
    fmt = body.get("response_format")
    if fmt and fmt.get("type") == "json_schema":
        return "json_schema"
    if fmt and fmt.get("type") == "json_object" and "schema" in fmt:
        return "json_object_schema"
    if body.get("tools") and body.get("tool_choice"):
        return "tools"
    return "none"


class FakeServer:
    """A chat-completions endpoint that accepts the request modes in ``accepts``, answers the
    others with ``refusal(mode)`` (status, body), records every request body and replies with
    the next of ``replies`` (dicts are sent as JSON), as content or as a tool call's arguments."""

    def __init__(self, accepts: set[str], refusal, replies: list[Any] | None = None, delay_s: float = 0.0,
                 ignores_tool_choice: bool = False):
        self.accepts, self.refusal, self.delay_s = accepts, refusal, delay_s
        self.ignores_tool_choice = ignores_tool_choice  # takes tools but answers in content
        self.replies: list[Any] = list(replies or [])
        self.bodies: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)

    def modes(self) -> list[str]:
        return [request_mode(b) for b in self.bodies]

    async def _chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        await asyncio.sleep(self.delay_s)  # widens the window in which first requests race
        mode = request_mode(body)
        if mode not in self.accepts:
            status, error = self.refusal(mode)
            return JSONResponse(error, status_code=status)
        reply = self.replies.pop(0) if self.replies else {"n": 1}
        text = reply if isinstance(reply, str) else json.dumps(reply)
        if self.ignores_tool_choice:
            mode = "none"
        if body.get("stream"):
            return StreamingResponse(self._sse(text, mode, body), media_type="text/event-stream")
        return JSONResponse(self._completion(text, mode))

    @staticmethod
    def _completion(text: str, mode: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if mode == "tools":
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "respond", "arguments": text}}]}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "fake",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if mode == "tools" else "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    @staticmethod
    def _sse(text: str, mode: str, body: dict[str, Any]):
        def event(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        if mode == "tools":  # as OpenAI/vLLM stream a call: id and name first, then argument deltas
            yield event({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                                              "function": {"name": "respond", "arguments": ""}}]})
            for piece in pieces:
                yield event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            yield event({}, "tool_calls")
        else:
            yield event({"role": "assistant", "content": ""})
            for piece in pieces:
                yield event({"content": piece})
            yield event({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event({}, usage={"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)})
        yield "data: [DONE]\n\n"


def llama_cpp_python(**kw) -> FakeServer:
    """llama-cpp-python 0.3.x: ``text`` / ``json_object`` (+ ``schema``) only; tools are not forced."""
    return FakeServer({"json_object_schema", "none"}, lambda mode: (500, LLAMA_CPP_PY_REFUSAL), **kw)


def tools_only(**kw) -> FakeServer:
    def refusal(mode):
        return 400, {"error": {"message": f"response_format type is not supported ({mode})",
                               "type": "invalid_request_error", "param": "response_format", "code": None}}
    return FakeServer({"tools", "none"}, refusal, **kw)


def refuses_all(**kw) -> FakeServer:
    def refusal(mode):
        field = "tools" if mode == "tools" else "response_format"
        return 400, {"error": {"message": f"'{field}' is not supported by this server",
                               "type": "invalid_request_error", "param": field, "code": None}}
    return FakeServer({"none"}, refusal, **kw)


def remote(url: str, **kw) -> RemoteLLM:
    return RemoteLLM(url, model="fake", **kw)


# -- auto detection ------------------------------------------------------------------------

async def test_auto_picks_json_object_schema_on_llama_cpp_python_and_probes_once(caplog):
    fake = llama_cpp_python(replies=[{"n": 7}, {"n": 8}])
    with live_server(fake.app) as url, caplog.at_level(logging.INFO, logger="agentrt.remote"):
        llm = remote(url)
        assert "detected" in llm.engine_summary
        first = await llm.complete(MESSAGES, json_schema=SCHEMA)
        second = await llm.complete(MESSAGES, json_schema=SCHEMA)
    assert json.loads(first.text) == {"n": 7} and json.loads(second.text) == {"n": 8}
    assert first.usage.prompt_tokens == 5 and first.usage.completion_tokens > 0
    # one refused probe, then json_object+schema for this request and every later one
    assert fake.modes() == ["json_schema", "json_object_schema", "json_object_schema"]
    assert llm.constrain_mode == "json_object_schema"
    assert "constrained by json_object_schema" in llm.engine_summary
    assert "constrain=json_object_schema" in caplog.text


async def test_auto_picks_tools_and_reads_the_answer_from_the_tool_call():
    fake = tools_only(replies=[{"n": 42}, "plain text"])
    with live_server(fake.app) as url:
        llm = remote(url)
        chunks = [c async for c in llm.stream(MESSAGES, json_schema=SCHEMA)]
        plain = await llm.complete(MESSAGES)  # no schema: no constraint at all
    deltas = "".join(c.delta for c in chunks)
    assert json.loads(deltas) == {"n": 42} and chunks[-1].completion.text == deltas
    assert fake.modes() == ["json_schema", "json_object_schema", "tools", "none"]
    assert llm.constrain_mode == "tools" and plain.text == "plain text"
    assert "tools" not in fake.bodies[-1] and "response_format" not in fake.bodies[-1]


async def test_tools_mode_takes_content_when_the_server_sends_no_tool_call():
    fake = FakeServer({"tools"}, None, replies=[{"n": 5}], ignores_tool_choice=True)
    with live_server(fake.app) as url:
        chunks = [c async for c in remote(url, constrain="tools").stream(MESSAGES, json_schema=SCHEMA)]
    assert json.loads("".join(c.delta for c in chunks)) == {"n": 5}
    assert json.loads(chunks[-1].completion.text) == {"n": 5}


async def test_concurrent_first_requests_probe_once():
    fake = llama_cpp_python(replies=[{"n": i} for i in range(6)], delay_s=0.05)
    with live_server(fake.app) as url:
        llm = remote(url)
        outs = await asyncio.gather(*(llm.complete(MESSAGES, json_schema=SCHEMA) for _ in range(6)))
    assert sorted(json.loads(o.text)["n"] for o in outs) == list(range(6))
    assert fake.modes().count("json_schema") == 1 and fake.modes().count("json_object_schema") == 6


async def test_refusing_every_format_is_a_clear_error():
    fake = refuses_all()
    with live_server(fake.app) as url:
        with pytest.raises(ConstraintUnsupportedError) as info:
            await remote(url).complete(MESSAGES, json_schema=SCHEMA)
    text = str(info.value)
    assert f"the server at {url}/v1 cannot constrain output to a JSON Schema" in text
    assert "tried json_schema, json_object+schema, tools" in text
    assert "HTTP 400: 'tools' is not supported" in text and "constrain='none'" in text
    assert fake.modes() == ["json_schema", "json_object_schema", "tools"]


async def test_an_error_of_every_request_is_not_taken_for_a_format_refusal():
    """An over-long prompt fails whatever the format: that error is raised, not 'cannot constrain'."""
    fake = FakeServer(set(), lambda mode: (400, {"error": {"message": "context length exceeded"}}))
    with live_server(fake.app) as url:
        with pytest.raises(openai.BadRequestError, match="context length"):
            await remote(url).complete(MESSAGES, json_schema=SCHEMA)


async def test_transient_and_auth_errors_do_not_decide_the_mode():
    busy = FakeServer(set(), lambda mode: (429, {"error": {"message": "slow down"}}))
    with live_server(busy.app) as url:
        llm = remote(url, max_retries=1)
        with pytest.raises(openai.RateLimitError):
            await llm.complete(MESSAGES, json_schema=SCHEMA)
    # probed without retries, then once more through the retrying client (which retried once)
    assert busy.modes() == ["json_schema"] * 3 and llm.constrain_mode is None
    assert not rejects_format(openai.AuthenticationError("no", response=_response(401), body=None))
    assert rejects_format(openai.InternalServerError("x", response=_response(500), body=LLAMA_CPP_PY_REFUSAL))
    gone = remote("http://127.0.0.1:9", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        await gone.complete(MESSAGES, json_schema=SCHEMA)
    assert gone.constrain_mode is None


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("POST", "http://x/v1/chat/completions"))


def test_short_reason_is_the_servers_message():
    exc = openai.InternalServerError("Error code: 500", response=_response(500), body=LLAMA_CPP_PY_REFUSAL)
    reason = short_reason(exc)
    assert reason.startswith("HTTP 500: 1 validation error: {'type': 'literal_error'") and len(reason) < 180


# -- explicit modes send exactly their fields ---------------------------------------------

@pytest.mark.parametrize("mode, fields", [
    ("json_schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "agentrt_turn", "schema": SCHEMA, "strict": True}}}),
    ("json_object_schema", {"response_format": {"type": "json_object", "schema": SCHEMA}}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "respond", "parameters": SCHEMA, "strict": True}}],
               "tool_choice": {"type": "function", "function": {"name": "respond"}}}),
    ("none", {}),
])
async def test_explicit_mode_sends_exactly_its_fields(mode, fields, caplog):
    fake = FakeServer({"json_schema", "json_object_schema", "tools", "none"}, None, replies=[{"n": 3}])
    with live_server(fake.app) as url, caplog.at_level(logging.WARNING, logger="agentrt.remote"):
        llm = remote(url, constrain=mode)
        out = await llm.complete(MESSAGES, json_schema=SCHEMA, params=GenerationParams(max_tokens=9))
    assert json.loads(out.text) == {"n": 3} and len(fake.bodies) == 1  # no probing
    body = fake.bodies[0]
    sent = {k: body[k] for k in ("response_format", "tools", "tool_choice") if k in body}
    assert sent == fields
    assert body["messages"] == MESSAGES and body["max_tokens"] == 9 and body["model"] == "fake"
    if mode == "none":
        assert "unconstrained" in llm.engine_summary and "not constrained" in caplog.text
    else:
        assert f"constrained by {mode}" in llm.engine_summary
        assert not [r for r in caplog.records if r.name == "agentrt.remote"]  # no warning of ours


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="constrain must be one of"):
        RemoteLLM("http://h:1", constrain="grammar")


async def test_explicit_json_schema_on_llama_cpp_python_fails_as_before():
    fake = llama_cpp_python()
    with live_server(fake.app) as url:
        with pytest.raises(openai.InternalServerError):
            await remote(url, constrain="json_schema", max_retries=0).complete(MESSAGES, json_schema=SCHEMA)


# -- an agent run completes through each mode ------------------------------------------------

TURNS = [{"calls": [{"tool": "add", "arguments": {"a": 20, "b": 22}}]}, {"answer": "42"}]


@pytest.mark.parametrize("server, constrain, expected", [
    (llama_cpp_python, "auto", "json_object_schema"),
    (tools_only, "auto", "tools"),
    (tools_only, "tools", "tools"),
    (refuses_all, "none", "none"),
])
async def test_agent_run_through_each_mode(server, constrain, expected):
    fake = server(replies=list(TURNS))
    with live_server(fake.app) as url:
        llm = remote(url, constrain=constrain)
        result = await Agent(llm, make_registry(), max_steps=4).run("What is 20 + 22?")
    assert result.status == "completed" and result.answer == "42", result
    assert result.steps[0].results[0].content == "42"
    assert llm.constrain_mode == expected and fake.modes()[-2:] == [expected, expected]
    # a refused probe is asked once, not retried by the client
    assert fake.modes().count("json_schema") == (1 if constrain == "auto" else 0)
