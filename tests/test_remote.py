"""RemoteLLM against agentrt's own server on loopback (scripted model behind it)."""
from __future__ import annotations

import json

import pytest

from agentrt.llm import GenerationParams
from agentrt.planner import Agent
from agentrt.remote import RemoteLLM, _normalise_base_url
from agentrt.server import create_app
from agentrt.testing import ScriptedLLM
from tests.helpers.server import live_server
from tests.test_server import make_registry

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture(scope="module")
def served():
    backend = ScriptedLLM([])
    with live_server(create_app(llm=backend, registry=make_registry(), model_name="served-model",
                                api_keys=["k1"])) as url:
        yield backend, url


async def test_complete_sends_the_schema_and_messages_unchanged(served):
    backend, url = served
    backend._replies[:] = [{"n": 7}]
    llm = RemoteLLM(url, api_key="k1")
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "seven?"}]
    out = await llm.complete(messages, json_schema=SCHEMA, params=GenerationParams(max_tokens=20))
    assert json.loads(out.text) == {"n": 7} and out.finish_reason == "stop"
    assert llm.model_name == "served-model"  # asked the server
    seen_messages, seen_schema, _ = backend.calls[-1]
    assert seen_schema == SCHEMA and seen_messages == messages
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    assert out.ttft_s > 0


async def test_stream_yields_deltas_then_completion(served):
    backend, url = served
    backend._replies[:] = ["hello remote world"]
    chunks = [c async for c in RemoteLLM(url, model="served-model", api_key="k1").stream(
        [{"role": "user", "content": "hi"}])]
    assert "".join(c.delta for c in chunks) == "hello remote world"
    assert chunks[-1].completion is not None and chunks[-1].completion.text == "hello remote world"
    assert backend.calls[-1][1] is None


async def test_agent_runs_through_remote_llm(served):
    backend, url = served
    backend._replies[:] = [{"calls": [{"tool": "add", "arguments": {"a": 20, "b": 22}}]}, {"answer": "42"}]
    before = len(backend.calls)
    agent = Agent(RemoteLLM(url, api_key="k1"), make_registry(), max_steps=4)
    result = await agent.run("What is 20 + 22?")
    assert result.status == "completed" and result.answer == "42"
    assert result.steps[0].results[0].content == "42"
    # the planner's tool-call grammar travelled to the server as response_format
    schema = backend.calls[before][1]
    assert "anyOf" in schema and '"add"' in json.dumps(schema)


async def test_wrong_key_is_an_authentication_error(served):
    import openai

    _, url = served
    with pytest.raises(openai.AuthenticationError):
        await RemoteLLM(url, model="m", api_key="wrong", max_retries=0).complete([{"role": "user", "content": "x"}])


def test_base_url_normalised():
    assert _normalise_base_url("http://h:8000") == "http://h:8000/v1"
    assert _normalise_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert _normalise_base_url("https://proxy/openai/v1") == "https://proxy/openai/v1"
    with pytest.raises(ValueError, match="http"):
        _normalise_base_url("h:8000")


def test_server_in_front_of_a_remote_passes_its_errors_through(served):
    """``agentrt serve --remote-url``: a server whose LLM is a RemoteLLM (scale-out front)."""
    from fastapi.testclient import TestClient

    backend, url = served
    backend._replies[:] = [{"calls": [{"tool": "add", "arguments": {"a": 1, "b": 1}}]}, {"answer": "2"}]
    front = create_app(llm=RemoteLLM(url, api_key="k1"), registry=make_registry())
    with TestClient(front) as c:
        body = c.post("/agent/run", json={"task": "1+1?", "tools": ["add"]}).json()
        assert body["status"] == "completed" and body["answer"] == "2"
        assert body["steps"][0]["results"][0]["content"] == "2"
    bad_key = create_app(llm=RemoteLLM(url, model="m", api_key="wrong", max_retries=0), registry=make_registry())
    with TestClient(bad_key) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    gone = create_app(llm=RemoteLLM("http://127.0.0.1:9", model="m", max_retries=0), registry=make_registry())
    with TestClient(gone) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


def test_one_remote_llm_serves_one_event_loop_after_another(served):
    """Pooled connections belong to the event loop that opened them: a RemoteLLM used under a second
    ``anyio.run`` (a second `Agent.run_sync`) must not fail with "Event loop is closed"."""
    import anyio

    backend, url = served
    llm = RemoteLLM(url, api_key="k1")
    for n in (1, 2, 3):
        backend._replies[:] = [{"n": n}]
        out = anyio.run(lambda: llm.complete([{"role": "user", "content": "n?"}], json_schema=SCHEMA))
        assert json.loads(out.text) == {"n": n}
