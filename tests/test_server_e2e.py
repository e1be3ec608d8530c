"""The real server on loopback: uvicorn + the embedded SmolLM2-135M, driven by the
official ``openai`` client and httpx. One server for the whole module (loading costs)."""
from __future__ import annotations

import json
import time

import anyio
import httpx
import jsonschema
import openai
import pytest

from agentrt.llm import GenerationParams
from agentrt.server import create_app
from tests.helpers.server import live_server, prometheus_samples, sse_events

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def server():
    # Small admission limits so that the 429 test can fill the queue with a few requests.
    app = create_app(llm=None, max_concurrent=2, max_queue=2)
    with live_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def check_call(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TOOL_SCHEMAS[call.function.name])
    return args


def test_tool_calling_round_trip(client):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                       max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    check_call(call)
    follow = ASK + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    r2 = client.chat.completions.create(model=model, messages=follow, tools=[WEATHER, ADD], max_tokens=64)
    c2 = r2.choices[0]
    assert c2.finish_reason in ("stop", "tool_calls")
    if c2.finish_reason == "stop":
        assert c2.message.content and not c2.message.tool_calls
    else:
        for call in c2.message.tool_calls:
            check_call(call)


def test_named_tool_choice(client):
    r = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is 2 plus 40?"}], tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False, max_tokens=64)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "add"
    check_call(call)


def test_streamed_tool_call_deltas_reassemble(client):
    stream = client.chat.completions.create(model="any", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            max_tokens=64, stream=True, stream_options={"include_usage": True})
    calls: dict[int, dict] = {}
    finish, usage, n_arg_chunks = None, None, 0
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "args": ""})
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["args"] += tc.function.arguments
                    n_arg_chunks += 1
    assert finish == "tool_calls" and calls
    for slot in calls.values():
        assert slot["name"] == "get_weather"
        jsonschema.validate(json.loads(slot["args"]), WEATHER["function"]["parameters"])
    assert n_arg_chunks > 1  # the arguments really streamed
    assert usage is not None and usage.completion_tokens > 0


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Name a big city and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        max_tokens=64)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_cached_tokens_on_repeated_prefix(client):
    system = "You are a meticulous assistant. " + " ".join(f"Rule {i}: answer briefly." for i in range(40))
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}]
    first = client.chat.completions.create(model="any", messages=msgs, max_tokens=8)
    msgs[1]["content"] = "Say goodbye."
    second = client.chat.completions.create(model="any", messages=msgs, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 200
    assert cached >= 0.8 * first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)


def test_agent_run_plain_and_streamed(server):
    app, url = server
    registry = app.state.agentrt.registry
    body = {"task": "What is 12 times 7?", "tools": ["calculate"], "tool_choice": "calculate", "max_steps": 3}
    with httpx.Client(base_url=url, timeout=300) as c:
        r = c.post("/agent/run", json=body)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["status"] in ("completed", "max_steps")
        first = result["steps"][0]
        assert first["calls"] and first["calls"][0]["name"] == "calculate"
        for step in result["steps"]:
            for call in step["calls"]:
                jsonschema.validate(call["arguments"], registry.get(call["name"]).spec.parameters)
        assert first["ttft_s"] > 0 and first["prompt_tokens"] > 0
        if len(result["steps"]) > 1:  # step 2 extends step 1's prompt: served from the cache
            assert result["steps"][1]["cached_tokens"] >= first["prompt_tokens"]
        with c.stream("POST", "/agent/run", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds[0] == "step_started" and "tool_call" in kinds and "tool_result" in kinds
    assert kinds[-1] == "run_finished"
    assert kinds.index("tool_call") < kinds.index("tool_result")


def test_bad_inputs_are_4xx(server, client):
    _, url = server
    with httpx.Client(base_url=url, timeout=120) as c:
        tags = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                          "uniqueItems": True}}}
        r = c.post("/v1/chat/completions", json={"messages": ASK, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": tags}}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_schema"
        assert "uniqueItems" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER["function"]["parameters"]}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # no complete value fits
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 9000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 10**6})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER],
                                                 "tool_choice": {"type": "function", "function": {"name": "rm"}}})
        assert r.status_code == 400 and "rm" in r.json()["error"]["message"]
        r = c.post("/agent/run", json={"task": "word " * 9000, "tools": ["calculate"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        # far beyond the window: refused from its length, before any tokenizing
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 200_000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "at least" in r.json()["error"]["message"]
        r = c.post("/agent/run", json={"task": "x", "tools": ["shell"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_tool"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=ASK, max_tokens=0)


async def test_full_queue_answers_429(server):
    app, url = server
    results: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        async def one() -> None:
            results.append(await c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 24}))

        async with anyio.create_task_group() as tg:
            for _ in range(7):
                tg.start_soon(one)
    codes = [r.status_code for r in results]
    assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    assert all(r.headers.get("retry-after") for r in results if r.status_code == 429)
    assert app.state.agentrt.queue.running == 0


def test_disconnect_cancels_and_frees_kv_blocks(server):
    app, url = server
    llm = app.state.agentrt.llm
    with httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                "max_tokens": 2000, "stream": True, "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break  # first generated text: hang up
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = llm.stats()
            if stats.running == 0 and stats.waiting == 0 and app.state.agentrt.queue.running == 0:
                break
            time.sleep(0.1)
    stats = llm.stats()
    assert stats.running == 0 and stats.waiting == 0, stats
    assert stats.kv_blocks_used == 0  # no live sequence holds a block: the aborted one freed its own
    # (2000 tokens would take minutes: being idle within 30 s means the request was aborted)
    metrics = httpx.get(url + "/metrics").text
    assert "agentrt_queue_depth 0.0" in metrics and "agentrt_running_requests 0.0" in metrics
    samples = prometheus_samples(metrics)
    assert samples["agentrt_ttft_seconds_count"] > 0 and samples["agentrt_prefix_cache_hit_rate"] > 0
    assert samples['agentrt_tokens_total{kind="cached"}'] > 0


async def test_remote_llm_agent_against_the_real_server(server):
    """Scale-out path: the planner and tools here, generation on the server via RemoteLLM."""
    from agentrt.planner import Agent
    from agentrt.remote import RemoteLLM
    from agentrt.tools import builtin_registry

    _, url = server
    registry = builtin_registry().subset(["calculate"])
    agent = Agent(RemoteLLM(url), registry, tool_choice="calculate", max_steps=3,
                  params=GenerationParams(max_tokens=48))
    result = await agent.run("What is 15 times 4?")
    assert result.steps and result.steps[0].calls[0].name == "calculate"
    for step in result.steps:
        for call in step.calls:
            jsonschema.validate(call.arguments, registry.get(call.name).spec.parameters)
    assert result.steps[0].ttft_s > 0
    if len(result.steps) > 1:  # cached tokens travel back in usage.prompt_tokens_details
        assert result.steps[1].cached_tokens >= result.steps[0].prompt_tokens


@pytest.mark.parametrize("body, param, says", [
    ({"stop": [""]}, "stop", "non-empty"),
    ({"seed": 2**64, "temperature": 0.7}, "seed", "less than or equal to 18446744073709551615"),
    ({"seed": -(2**63) - 1, "temperature": 0.7}, "seed", "greater than or equal to -9223372036854775808"),
    ({"temperature": float("nan")}, "temperature", "finite number"),
    ({"top_p": float("inf")}, "top_p", "finite number"),
])
def test_sampling_params_the_engine_cannot_use_are_400(server, body, param, says):
    _, url = server
    # written by hand: clients that send NaN / Infinity exist, though httpx's json= refuses them
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps({"messages": ASK, "max_tokens": 4, **body}),
                   headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err.get("param") or err["message"]) and says in err["message"], err


def _stream_text(c: httpx.Client, body: dict) -> tuple[str, list[str]]:
    """(the streamed content, the finish reasons seen) of one chat stream; asserts it ended with [DONE]."""
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events and events[-1][1] == "[DONE]", events[-3:]
    chunks = [e for _, e in events[:-1]]
    assert not any("error" in ch for ch in chunks), chunks
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    return text, [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]


def test_a_tiny_temperature_beside_a_stream_harms_neither(server):
    """temperature 1e-40 once made torch.multinomial raise: a 500 for it, and the stream batched with
    it was cut without a finish reason. Now both complete, and the stream equals its solo run."""
    _, url = server
    count = {"messages": [{"role": "user", "content": "Count from one to fifty in words."}], "max_tokens": 48}
    with httpx.Client(base_url=url, timeout=300) as c:
        solo = _stream_text(c, count)
        results: dict[str, object] = {}

        def hostile() -> None:
            time.sleep(0.3)  # land while the stream decodes
            for t in (1e-40, 1e-300):
                results[t] = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 16,
                                                                  "temperature": t, "seed": 5}).status_code

        import threading

        th = threading.Thread(target=hostile)
        th.start()
        beside = _stream_text(c, count)
        th.join()
    assert results == {1e-40: 200, 1e-300: 200}
    assert beside == solo and solo[1] in (["length"], ["stop"])
