"""Route logic of the HTTP server with scripted LLMs (fast; no model)."""
from __future__ import annotations

import json

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

from agentrt.llm import Completion, Prompt
from agentrt.registry import ToolRegistry
from agentrt.server import create_app
from agentrt.testing import ScriptedLLM
from tests.helpers.planner import add, shout
from tests.helpers.server import live_server, prometheus_samples, slow_llm, sse_events

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def make_registry() -> ToolRegistry:
    return ToolRegistry([add, shout])  # the planner helpers' tools, in a registry of this test's own


def client(llm, **kw) -> TestClient:
    return TestClient(create_app(llm=llm, registry=kw.pop("registry", make_registry()), **kw))


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"] or w == err["param"] or w == err["code"], (w, err)
    return err


# ------------------------------------------------------------------ chat completions


def test_tool_call_round_trip_is_openai_shaped():
    llm = ScriptedLLM([{"calls": [{"tool": "get_weather", "arguments": {"city": "Paris"}}]}, {"answer": "Sunny."}])
    with client(llm) as c:
        r = c.post("/v1/chat/completions", json={"model": "x", "messages": USER, "tools": [WEATHER_TOOL, ADD_TOOL]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "scripted"
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert "cached_tokens" in body["usage"]["prompt_tokens_details"]
        # the grammar offered both tools and the answer; the prompt lists the tools
        schema = llm.calls[0].json_schema
        assert "anyOf" in schema and "get_weather" in json.dumps(schema) and "add" in json.dumps(schema)
        # second turn: the tool result goes back, the answer comes out as content
        messages = USER + [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"}]
        r = c.post("/v1/chat/completions", json={"model": "x", "messages": messages, "tools": [WEATHER_TOOL]})
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Sunny."}
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        rendered = json.dumps(llm.calls[1][0])
        assert "sunny, 21C" in rendered and "Paris" in rendered


def test_tool_choice_required_and_named_restrict_the_grammar():
    llm = ScriptedLLM([{"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}}]}] * 2)
    with client(llm) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL, ADD_TOOL],
                                                 "tool_choice": "required"})
        assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
        assert '"answer"' not in json.dumps(llm.calls[0][1])
        r = c.post("/v1/chat/completions", json={
            "messages": USER, "tools": [WEATHER_TOOL, ADD_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "add"}}, "parallel_tool_calls": False})
        assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
        schema = json.dumps(llm.calls[1][1])
        assert '"add"' in schema and '"get_weather"' not in schema and '"answer"' not in schema
        assert '"maxItems": 1' in schema


def test_tool_choice_none_and_plain_text():
    llm = ScriptedLLM(["Hello there.", "Hi."])
    with client(llm) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "none"})
        assert r.json()["choices"][0]["message"]["content"] == "Hello there."
        r = c.post("/v1/chat/completions", json={"messages": USER})
        assert r.json()["choices"][0]["message"]["content"] == "Hi."
    assert llm.calls[0][1] is None and llm.calls[1][1] is None


def test_response_format_json_schema_and_json_object():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    llm = ScriptedLLM([{"city": "Paris"}, {"k": 1}])
    with client(llm) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "response_format": {
            "type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}})
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"city": "Paris"}
        assert llm.calls[0][1] == schema
        r = c.post("/v1/chat/completions", json={"messages": USER, "response_format": {"type": "json_object"}})
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"k": 1}
        assert llm.calls[1][1] == {"type": "object"}


def test_streamed_tool_calls_reassemble():
    calls = {"calls": [{"tool": "get_weather", "arguments": {"city": "Paris \"FR\""}},
                       {"tool": "add", "arguments": {"a": 2, "b": 40}}]}
    with client(ScriptedLLM([calls])) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": USER, "tools": [WEATHER_TOOL, ADD_TOOL], "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
    assert events[-1] == (None, "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    got: dict[int, dict] = {}
    for ch in chunks:
        for choice in ch["choices"]:
            for tc in choice["delta"].get("tool_calls", []):
                slot = got.setdefault(tc["index"], {"name": "", "args": "", "id": None})
                slot["id"] = tc.get("id") or slot["id"]
                slot["name"] += tc.get("function", {}).get("name", "")
                slot["args"] += tc.get("function", {}).get("arguments", "")
    assert [got[i]["name"] for i in sorted(got)] == ["get_weather", "add"]
    assert [json.loads(got[i]["args"]) for i in sorted(got)] == [c["arguments"] for c in calls["calls"]]
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finishes[-1] == "tool_calls" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0


def test_streamed_answer_content():
    with client(ScriptedLLM([{"answer": "It is sunny\nin Paris."}])) as c:
        with c.stream("POST", "/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL],
                                                            "stream": True}) as r:
            events = sse_events(r.iter_lines())
    text = "".join(d["choices"][0]["delta"].get("content") or "" for _, d in events[:-1])
    assert text == "It is sunny\nin Paris."
    assert events[-2][1]["choices"][0]["finish_reason"] == "stop"


def test_length_cut_tool_call_is_not_passed_off_as_complete():
    cut = Completion(text='{"calls":[{"tool":"add","arguments":{"a":1,', finish_reason="length")
    with client(ScriptedLLM([cut])) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "tools": [ADD_TOOL], "max_tokens": 12})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]


def _streamed_message(c: TestClient, body: dict) -> dict:
    """The streamed answer of ``body`` reassembled as an OpenAI client does."""
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [d for _, d in sse_events(r.iter_lines())[:-1]]
    content, calls = "", {}
    for ch in chunks:
        for choice in ch["choices"]:
            content += choice["delta"].get("content") or ""
            for tc in choice["delta"].get("tool_calls", []):
                slot = calls.setdefault(tc["index"], {"name": tc["function"].get("name"), "arguments": ""})
                slot["arguments"] += tc["function"].get("arguments", "")
    return {"content": content or None, "calls": [calls[i] for i in sorted(calls)]}


def test_non_streamed_texts_are_the_models_own_as_streamed():
    """The same generation reads the same streamed and not: a call's arguments and a structured answer
    are the model's JSON text, not their values re-serialized (which would turn 2.1237107879569874 into
    2.123710787956987, 1e5 into 100000.0 and \\u00e9 into é; found by tests/test_stream_equivalence.py)."""
    args = '{"x":2.1237107879569874,"big":1e5,"name":"caf\\u00e9 \\"A\\""}'
    call = Completion(text='{"calls":[{"tool":"f","arguments":' + args + '}]}', finish_reason="stop")
    answer = Completion(text='{"answer":{"v":[1.50,-0.0]}}', finish_reason="stop")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "number"}, "big": {"type": "number"}, "name": {"type": "string"}}}}}
    body = {"messages": USER, "tools": [tool]}
    with client(ScriptedLLM([call, call, answer, answer])) as c:
        plain = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        streamed = _streamed_message(c, body)
        assert [tc["function"]["arguments"] for tc in plain["tool_calls"]] == [args]
        assert streamed["calls"] == [{"name": "f", "arguments": args}]
        plain = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert plain["content"] == '{"v":[1.50,-0.0]}' == _streamed_message(c, body)["content"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "temperature": 7}, "temperature"),
    ({"messages": USER, "n": 3}, "n"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "top_logprobs": 5}, "top_logprobs"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
])
def test_invalid_fields_are_400_with_the_field_path(body, param):
    with client(ScriptedLLM([])) as c:
        err = assert_error(c.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param, err


def test_malformed_json_and_wrong_types():
    with client(ScriptedLLM([])) as c:
        assert_error(c.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}),
                     400, "invalid_json")
        assert_error(c.post("/v1/chat/completions", json=[1, 2]), 400)


def test_semantic_errors_name_what_to_fix():
    with client(ScriptedLLM([]), max_body_bytes=4096) as c:
        post = lambda body: c.post("/v1/chat/completions", json={"messages": USER, **body})  # noqa: E731
        assert_error(post({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                     400, "nope", "get_weather")
        assert_error(post({"tool_choice": "required"}), 400, "tool_choice")
        assert_error(post({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                     400, "response_format.json_schema.schema")
        assert_error(post({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}),
                     400, "invalid_schema")
        assert_error(post({"max_tokens": 10**9}), 400, "max_tokens")
        assert_error(post({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}), 400,
            "messages.0.tool_calls.0.function.arguments")
        assert_error(post({"messages": [{"role": "user", "content": "x" * 5000}]}), 413, "request_too_large")
        assert_error(c.get("/v1/nothing"), 404)

        def chunked():  # no Content-Length: the limit is found while reading
            yield b'{"messages":[{"role":"user","content":"'
            for _ in range(100):
                yield b"x" * 50
            yield b'"}]}'

        assert_error(c.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}),
                     413, "request_too_large")


def test_api_keys():
    with client(ScriptedLLM(["ok"]), api_keys=["sekret"]) as c:
        assert_error(c.post("/v1/chat/completions", json={"messages": USER}), 401, "invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer s\xc3\xa9".encode("latin-1")}), 401)
        r = c.post("/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200  # liveness stays open


def test_openapi_docs_need_the_key_unless_public():
    key = {"Authorization": "Bearer sekret"}
    with client(ScriptedLLM([]), api_keys=["sekret"]) as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert_error(c.get(path), 401, "invalid_api_key")
            assert c.get(path, headers=key).status_code == 200, path
        schema = c.get("/openapi.json", headers=key).json()
        assert "/v1/chat/completions" in schema["paths"] and "/docs" not in schema["paths"]
        assert "/openapi.json" in c.get("/docs", headers=key).text
    with client(ScriptedLLM([]), api_keys=["sekret"], public_docs=True) as c:
        assert all(c.get(path).status_code == 200 for path in ("/openapi.json", "/docs", "/redoc"))
        assert_error(c.get("/v1/models"), 401)
    with client(ScriptedLLM([])) as c:  # no keys: nothing to protect
        assert c.get("/openapi.json").status_code == 200


async def test_full_queue_answers_429_with_retry_after():
    llm = slow_llm(delay_s=0.02)
    app = create_app(llm=llm, registry=make_registry(), max_concurrent=1, max_queue=1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await c.post("/v1/chat/completions", json={"messages": USER}))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429], codes
    limited = [r for r in results if r.status_code == 429][0]
    assert limited.headers["retry-after"] == "1" and limited.json()["error"]["code"] == "queue_full"
    assert app.state.agentrt.queue.running == 0 and app.state.agentrt.queue.waiting == 0


def test_disconnect_cancels_the_generation():
    llm = slow_llm(delay_s=0.05)
    app = create_app(llm=llm, registry=make_registry())
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=10) as c:
            with c.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
                for line in r.iter_lines():
                    if '"content":"x' in line.replace(" ", ""):
                        break  # leave after the first content delta
            for _ in range(100):
                if llm.closed_early and app.state.agentrt.queue.running == 0:
                    break
                anyio.run(anyio.sleep, 0.05)
    assert llm.started == 1 and llm.closed_early == 1 and llm.finished == 0
    assert app.state.agentrt.queue.running == 0


# ------------------------------------------------------------------ other routes


def test_models_tools_health_metrics():
    llm = ScriptedLLM([{"answer": "hi"}])
    with client(llm, model_name="smol") as c:
        assert c.get("/health").json() == {"status": "ok", "model": "smol"}
        assert c.get("/v1/models").json()["data"][0]["id"] == "smol"
        tools = {t["name"]: t for t in c.get("/tools").json()["tools"]}
        assert set(tools) == {"add", "shout"}
        assert tools["add"]["parameters"]["required"] == ["a", "b"]
        c.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL]})
        text = c.get("/metrics").text
    for name in ("agentrt_ttft_seconds_bucket", "agentrt_tokens_total{kind=\"prompt\"}", "agentrt_queue_depth",
                 "agentrt_running_requests", "agentrt_prefix_cache_hit_rate", "agentrt_agent_step_seconds_bucket",
                 'agentrt_requests_total{route="/v1/chat/completions",status="200"} 1.0'):
        assert name in text, name


# ------------------------------------------------------------------ /agent/run


def agent_llm() -> ScriptedLLM:
    return ScriptedLLM([{"calls": [{"tool": "add", "arguments": {"a": 2, "b": 3}}]},
                        {"calls": [{"tool": "shout", "arguments": {"text": "five"}}]},
                        {"answer": "FIVE"}])


def test_agent_run_returns_answer_and_trace():
    with client(agent_llm()) as c:
        r = c.post("/agent/run", json={"task": "add 2 and 3 and shout it", "max_steps": 5})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["status"] == "completed" and body["answer"] == "FIVE"
    steps = body["steps"]
    assert [s["calls"][0]["name"] for s in steps[:2]] == ["add", "shout"]
    assert steps[0]["results"][0]["content"] == "5" and steps[1]["results"][0]["content"] == "FIVE"
    assert all("ttft_s" in s and "cached_tokens" in s for s in steps)


def test_agent_runs_fill_the_step_token_and_run_metrics():
    with client(agent_llm()) as c:
        assert c.post("/agent/run", json={"task": "add 2 and 3 and shout it"}).json()["status"] == "completed"
        with c.stream("POST", "/agent/run", json={"task": "x", "tools": ["add"], "max_steps": 1,
                                                  "stream": True}) as r:  # the script has run out: an error
            assert sse_events(r.iter_lines())[-1][1]["result"]["status"] == "error"
        text = c.get("/metrics").text
    samples = prometheus_samples(text)
    assert samples["agentrt_agent_step_seconds_count"] == 3  # the failed run raised before its step ended
    assert samples['agentrt_agent_runs_total{status="completed"}'] == 1
    assert samples['agentrt_agent_runs_total{status="error"}'] == 1
    assert samples["agentrt_agent_steps_count"] == 2
    assert samples['agentrt_tokens_total{kind="prompt"}'] > 0 and samples['agentrt_tokens_total{kind="completion"}'] > 0
    assert samples['agentrt_tokens_total{kind="cached"}'] > 0  # steps 2 and 3 extend step 1's prompt
    assert 0 < samples["agentrt_prefix_cache_hit_rate"] < 1


def test_agent_run_required_with_no_tools_is_400_like_the_chat_route():
    with client(agent_llm()) as c:
        err = assert_error(c.post("/agent/run", json={"task": "x", "tools": [], "tool_choice": "required"}), 400)
        assert err["param"] == "tool_choice" and "at least one tool" in err["message"]
        err = assert_error(c.post("/agent/run", content='{"task": "x", "temperature": NaN}',
                                  headers={"content-type": "application/json"}), 400)
        assert err["param"] == "temperature"


def test_default_server_runs_no_file_tool():
    with TestClient(create_app(llm=ScriptedLLM([]))) as c:  # registry None: the default one
        names = {t["name"] for t in c.get("/tools").json()["tools"]}
        assert "calculate" in names and not names & {"read_file", "list_files", "query_data"}
        for tool in ("read_file", "list_files"):
            assert_error(c.post("/agent/run", json={"task": "show /etc/passwd", "tools": [tool]}), 400, "unknown_tool")


def test_agent_run_streams_events():
    with client(agent_llm()) as c:
        with c.stream("POST", "/agent/run", json={"task": "add 2 and 3 and shout it", "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds.count("tool_call") == 2 and kinds.count("tool_result") == 2
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("final_answer")
    assert kinds[-1] == "run_finished" and events[-1][1]["result"]["answer"] == "FIVE"
    assert [d["result"]["content"] for k, d in events if k == "tool_result"] == ["5", "FIVE"]


def test_agent_run_output_schema():
    schema = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}
    llm = ScriptedLLM([{"answer": {"total": "many"}}, {"answer": {"total": 5}}])
    with client(llm) as c:
        body = c.post("/agent/run", json={"task": "2+3", "tools": ["add"], "output_schema": schema}).json()
    assert body["status"] == "completed" and body["answer"] == {"total": 5}
    assert '"total"' in json.dumps(llm.calls[0][1])  # the grammar carried the schema
    assert "total" in body["steps"][0]["error"]  # the bad answer was refused and fed back
    assert "many" in json.dumps(llm.calls[1][0])


def test_agent_run_bad_requests():
    with client(ScriptedLLM([])) as c:
        assert_error(c.post("/agent/run", json={"task": "x", "tools": ["add", "rm_rf"]}), 400, "rm_rf", "unknown_tool")
        assert_error(c.post("/agent/run", json={}), 400, "task")
        assert_error(c.post("/agent/run", json={"task": "x", "messages": USER}), 400, "task")
        assert_error(c.post("/agent/run", json={"task": "x", "tool_choice": "shell"}), 400, "shell")
        assert_error(c.post("/agent/run", json={"task": "x", "max_steps": 0}), 400, "max_steps")
        assert_error(c.post("/agent/run", json={"task": "x", "output_schema": {"type": "nope"}}), 400, "output_schema")


def test_disconnect_cancels_a_non_streamed_request():
    llm = slow_llm(delay_s=0.05)
    app = create_app(llm=llm, registry=make_registry())
    with live_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=0.6)
        for _ in range(100):
            if llm.closed_early and app.state.agentrt.queue.running == 0:
                break
            anyio.run(anyio.sleep, 0.05)
    assert llm.started == 1 and llm.closed_early == 1 and llm.finished == 0


def test_sampling_settings_reach_the_model():
    llm = ScriptedLLM(["text", {"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}}]}])
    with client(llm) as c:
        c.post("/v1/chat/completions", json={"messages": USER, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                             "seed": 3, "stop": ["END"], "max_completion_tokens": 33})
        c.post("/v1/chat/completions", json={"messages": USER, "tools": [ADD_TOOL], "stop": "}"})
    text, tools = [c.params for c in llm.calls]
    assert (text.temperature, text.top_p, text.top_k, text.seed, text.stop, text.max_tokens) == (
        0.7, 0.9, 20, 3, ["END"], 33)
    assert tools.temperature == 0.0  # greedy unless asked
    assert tools.stop == []  # the grammar ends JSON turns: a stop string would cut a call


def test_disconnect_cancels_a_streamed_agent_run():
    llm = slow_llm(delay_s=0.05)
    app = create_app(llm=llm, registry=make_registry())
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=10) as c:
            with c.stream("POST", "/agent/run", json={"task": "think long", "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: step_started"):
                        break  # hang up while the model is generating
            for _ in range(100):
                if llm.closed_early and app.state.agentrt.queue.running == 0:
                    break
                anyio.run(anyio.sleep, 0.05)
    assert llm.started == 1 and llm.closed_early == 1 and llm.finished == 0
    assert app.state.agentrt.queue.running == 0


def test_prompts_are_tokenized_off_the_event_loop():
    """Tokenizing a long prompt takes a while (a 1 MB one stalled /health for ~0.8 s when it ran on the
    event loop): the chat route and /agent/run count tokens in a worker thread."""
    import asyncio

    class Counting(ScriptedLLM):
        context_window = 4096

        def prepare_prompt(self, messages):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:  # no loop runs in this thread
                on_loop.append(False)
            return Prompt(messages=messages, token_ids=[0] * 10)

    on_loop: list[bool] = []
    with client(Counting(["ok", {"answer": "done"}])) as c:
        assert c.post("/v1/chat/completions", json={"messages": USER}).status_code == 200
        assert c.post("/agent/run", json={"task": "x", "tools": ["add"]}).status_code == 200
    assert on_loop == [False, False]


def test_unparsable_bodies_say_what_is_wrong():
    with client(ScriptedLLM([])) as c:
        post = lambda body: c.post("/v1/chat/completions", content=body,  # noqa: E731
                                   headers={"content-type": "application/json"})
        err = assert_error(post("[" * 100_000 + "]" * 100_000), 400, "nests JSON deeper", "levels")
        assert err["code"] == "too_deep"
        err = assert_error(post(b'{"messages": "\xff\xfe"}'), 400, "not UTF-8")
        assert err["code"] == "invalid_encoding"
        err = assert_error(post(b'{"messages": '), 400)
        assert err["code"] == "invalid_json"


def test_a_schema_nested_past_the_limit_is_refused_by_number():
    deep: dict = {"type": "string"}
    for _ in range(70):  # 141 levels of objects and arrays
        deep = {"anyOf": [deep]}
    with client(ScriptedLLM([])) as c:
        err = assert_error(c.post("/v1/chat/completions", json={"messages": USER, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": deep}}}), 400, "more than 128 levels")
        assert err["param"] == "response_format.json_schema.schema"
