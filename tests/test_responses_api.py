"""``POST /v1/responses``, OpenAI's Responses API (stateless subset).

Fast tests with a scripted model check the shapes strictly against the official client's pydantic
types (the client itself parses leniently) and the 400s; the e2e tests drive a real uvicorn server
with the embedded SmolLM2-135M through ``client.responses.create``: its answers are poor, but the
grammar makes every function call and json_schema output valid.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from agentrt.llm import Completion
from agentrt.server import create_app
from agentrt.testing import ScriptedLLM
from agentrt.types import Usage
from tests.helpers.server import live_server, sse_events

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city", "strict": True,
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
ASK = "What is the weather in Paris, in celsius?"
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}
PARIS_CALL = {"calls": [{"tool": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def scripted(*replies) -> TestClient:
    return TestClient(create_app(llm=ScriptedLLM(list(replies))))


def stream_events(c: TestClient, body: dict) -> list[dict]:
    """The events of a streamed response, each checked against the client's event types."""
    with c.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    for name, data in events:
        STREAM_EVENT.validate_python(data)
        assert name == data["type"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    return [d for _, d in events]


# ------------------------------------------------------------------ scripted model: shapes and errors


def test_function_call_then_its_output_round_trip():
    llm = ScriptedLLM([PARIS_CALL, {"answer": "Sunny, 21 degrees."}])
    with TestClient(create_app(llm=llm)) as c:
        r = c.post("/v1/responses", json={"model": "x", "input": ASK, "tools": [WEATHER], "metadata": {"k": "v"}})
        assert r.status_code == 200, r.text
        resp = Response.model_validate(r.json())
        assert resp.status == "completed" and resp.id.startswith("resp_") and resp.metadata == {"k": "v"}
        (call,) = resp.output
        assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
        assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
        assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens

        follow = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 degrees"}]
        r = c.post("/v1/responses", json={"input": follow, "tools": [WEATHER], "instructions": "Be brief."})
        resp = Response.model_validate(r.json())
        assert resp.output_text == "Sunny, 21 degrees." and resp.output[0].role == "assistant"
    shown = llm.calls[-1].messages  # the chat turn the model saw: instructions, the call, its result
    assert shown[0]["role"] == "system" and "Be brief." in shown[0]["content"]
    assert '"get_weather"' in shown[-2]["content"] and "sunny, 21 degrees" in shown[-1]["content"]


def test_streamed_function_call_reassembles():
    with scripted(PARIS_CALL) as c:
        events = stream_events(c, {"input": ASK, "tools": [WEATHER], "tool_choice": "required"})
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    final = Response.model_validate(events[-1]["response"])
    (call,) = final.output
    assert len(deltas) > 1 and "".join(deltas) == call.arguments == events[-3]["arguments"]
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"} and call.status == "completed"


def test_streamed_text_reassembles():
    with scripted({"answer": "It is sunny in Paris today."}) as c:
        events = stream_events(c, {"input": ASK, "tools": [WEATHER]})
    kinds = [e["type"] for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "It is sunny in Paris today." == Response.model_validate(events[-1]["response"]).output_text


def test_json_schema_format_goes_to_the_grammar():
    llm = ScriptedLLM(['{"city":"Paris","population":2100000}'])
    with TestClient(create_app(llm=llm)) as c:
        fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
        r = c.post("/v1/responses", json={"input": "A big city?", "text": {"format": fmt}})
        resp = Response.model_validate(r.json())
    assert llm.calls[0].json_schema == CITY
    assert json.loads(resp.output_text) == {"city": "Paris", "population": 2100000}
    assert resp.text.format.type == "json_schema"


def test_cut_by_max_output_tokens_is_incomplete():
    cut = Completion(text="It is sun", finish_reason="length", usage=Usage(prompt_tokens=9, completion_tokens=4))
    with scripted(cut, cut) as c:
        resp = Response.model_validate(c.post("/v1/responses", json={"input": ASK, "max_output_tokens": 4}).json())
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
        assert resp.output_text == "It is sun" and resp.output[0].status == "incomplete"
        events = stream_events(c, {"input": ASK, "max_output_tokens": 4})
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["output"][0]["status"] == "incomplete"


def test_unparsable_stream_ends_with_error_and_failed():
    with scripted('{"calls":[{"tool":"nope"') as c:  # output no grammar would allow
        events = stream_events(c, {"input": ASK, "tools": [WEATHER]})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"


@pytest.mark.parametrize("body, param, words", [
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", ["item_reference", "function_call_output"]),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "reasoning", "summary": []}]}, "input.1.type",
     ["reasoning", "message"]),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", ["stateless"]),
    ({"input": "hi", "conversation": "conv_1"}, "conversation", ["stateless"]),
    ({"input": "hi", "tools": [WEATHER, {"type": "web_search"}]}, "tools.1.type", ["web_search", "function tool"]),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning", ["not supported"]),
    ({"input": "hi", "include": ["reasoning.encrypted_content"]}, "include", ["not supported"]),
    ({"input": "hi", "background": True}, "background", ["not supported"]),
    ({"input": "hi", "frobnicate": 1}, "frobnicate", ["not supported"]),
    ({"input": "hi", "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type", ["not supported"]),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice",
     ["nope"]),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type", ["input_image"]),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "[1]"}]}, "input.0.arguments",
     ["JSON object"]),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id", ["Field required"]),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
     "text.format.schema", ["not a valid JSON Schema"]),
    ({"input": "hi", "tools": [{**WEATHER, "parameters": {"type": "string"}}]}, "tools.0.parameters", ["object"]),
    ({"input": "hi", "max_output_tokens": 10**9}, "max_output_tokens", ["max_output_tokens=1000000000"]),
    ({"input": []}, "input", ["at least 1"]),
])
def test_unsupported_or_invalid_input_is_a_400_naming_it(body, param, words):
    llm = ScriptedLLM([])
    with TestClient(create_app(llm=llm)) as c:
        r = c.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    for w in words:
        assert w in err["message"], (w, err)
    assert not llm.calls  # refused before any generation


def test_nulls_of_unsupported_parameters_are_accepted():
    # what SDKs send for "not set"; store is accepted although nothing is stored
    with scripted("hi") as c:  # no tools: free text
        r = c.post("/v1/responses", json={"input": "hi", "previous_response_id": None, "reasoning": {"effort": None},
                                          "include": [], "background": False, "store": True, "truncation": "disabled"})
    assert r.status_code == 200 and Response.model_validate(r.json()).output_text == "hi"


# ------------------------------------------------------------------ e2e: uvicorn + SmolLM2 + the openai client


@pytest.fixture(scope="module")
def client():
    with live_server(create_app(llm=None)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def check_call(item) -> dict:
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id
    args = json.loads(item.arguments)
    jsonschema.validate(args, WEATHER["parameters"])
    return args


@pytest.mark.e2e
def test_e2e_function_call_and_round_trip(client):
    resp = client.responses.create(model="any", input=ASK, tools=[WEATHER], tool_choice="required",
                                   max_output_tokens=48)
    assert resp.status == "completed" and resp.output[0].type == "function_call"
    call = resp.output[0]
    check_call(call)
    follow = [{"role": "user", "content": ASK}, call,
              {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 degrees"}]
    resp2 = client.responses.create(model="any", input=follow, tools=[WEATHER], tool_choice="none",
                                    max_output_tokens=32)
    assert resp2.output[0].type == "message" and resp2.output[0].role == "assistant" and resp2.output_text
    assert resp2.status in ("completed", "incomplete")  # free text: max_output_tokens may cut it


@pytest.mark.e2e
def test_e2e_streamed_function_call(client):
    events = list(client.responses.create(model="any", input=ASK, tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False, max_output_tokens=48, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and "response.function_call_arguments.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    (call,) = final.output
    check_call(call)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments


@pytest.mark.e2e
def test_e2e_streamed_text(client):
    events = list(client.responses.create(model="any", input="Say hello to Ada.", max_output_tokens=24,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")  # free text: max_output_tokens may cut it
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == events[-1].response.output_text


@pytest.mark.e2e
def test_e2e_json_schema_output(client):
    resp = client.responses.create(
        model="any", input="Name a big city and its population as JSON.", max_output_tokens=48,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), CITY)


@pytest.mark.e2e
def test_e2e_bad_input_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="any", input=[{"type": "computer_call_output", "call_id": "c", "output": {}}])
    assert e.value.body["param"] == "input.0.type" and "computer_call_output" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="any", input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="any", input="hi", tools=[{"type": "file_search", "vector_store_ids": ["v"]}])
    assert e.value.body["param"] == "tools.0.type"
