"""ChatAgentRT(base_url=...) against agentrt's own server on loopback (scripted model
behind it): the adapter plans the turn, the server runs it, the adapter parses it."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("langchain_core", reason="langchain-core (the 'langchain' extra) is not installed")

from langchain_core.tools import tool
from pydantic import BaseModel

from agentrt.langchain import ChatAgentRT
from agentrt.server import create_app
from agentrt.testing import ScriptedLLM
from tests.helpers.server import live_server


@tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny"


class Point(BaseModel):
    x: int
    y: int


@pytest.fixture(scope="module")
def served():
    backend = ScriptedLLM([])
    with live_server(create_app(llm=backend, model_name="served-model", api_keys=["k1"])) as url:
        yield backend, url


def test_remote_invoke_text_with_usage(served):
    backend, url = served
    backend._replies[:] = ["hello from the server"]
    msg = ChatAgentRT(base_url=url, api_key="k1", model="served-model").invoke("hi")
    assert msg.content == "hello from the server"
    assert msg.response_metadata["model_name"] == "served-model"
    assert msg.usage_metadata["input_tokens"] > 0 and msg.usage_metadata["output_tokens"] > 0


def test_remote_tool_call_and_stream(served):
    backend, url = served
    call = {"calls": [{"tool": "get_weather", "arguments": {"city": "Oslo"}}]}
    backend._replies[:] = [call, call]
    model = ChatAgentRT(base_url=url, api_key="k1", model="served-model").bind_tools([get_weather], tool_choice="any")
    msg = model.invoke("weather in Oslo?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Oslo"})]
    # the adapter's grammar travelled to the server unchanged
    assert '"const": "get_weather"' in json.dumps(backend.calls[-1][1])
    full = None
    for chunk in model.stream("weather in Oslo?"):
        full = chunk if full is None else full + chunk
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Oslo"})]


def test_remote_structured_output(served):
    backend, url = served
    backend._replies[:] = [{"x": 1, "y": 2}]
    out = ChatAgentRT(base_url=url, api_key="k1", model="served-model").with_structured_output(Point).invoke("a point")
    assert out == Point(x=1, y=2)
    assert backend.calls[-1][1]["required"] == ["x", "y"]


def test_remote_wrong_key_is_an_authentication_error(served):
    import openai

    _, url = served
    with pytest.raises(openai.AuthenticationError):
        ChatAgentRT(base_url=url, api_key="wrong", model="served-model", max_retries=1).invoke("hi")
