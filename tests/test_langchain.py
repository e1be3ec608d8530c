"""ChatAgentRT behind scripted LLMs: message mapping, tools, streaming, structured output,
usage, stop, retries and timeouts (no model is loaded here)."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

import pytest

pytest.importorskip("langchain_core", reason="langchain-core (the 'langchain' extra) is not installed")

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from agentrt.langchain import ChatAgentRT, to_agentrt_messages
from agentrt.llm import Completion
from agentrt.testing import ScriptedLLM
from agentrt.types import Usage
from tests.helpers.langchain import programmed


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny"


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


class JokeDict(TypedDict):
    """Joke to tell user."""

    setup: Annotated[str, ..., "question to set up a joke"]
    punchline: Annotated[str, ..., "answer to resolve the joke"]


CALL = {"calls": [{"tool": "magic_function", "arguments": {"input": 3}}]}
JOKE = {"setup": "Why did the cat sit on the computer?", "punchline": "To keep an eye on the mouse."}


def _schema_of(llm: ScriptedLLM, i: int = -1) -> dict:
    return llm.calls[i][1]


# ---------------------------------------------------------------- plain chat


def test_invoke_text_usage_and_metadata():
    llm = programmed([("Hi there!", "stop")], usage=Usage(prompt_tokens=20, completion_tokens=4, cached_tokens=12))
    msg = ChatAgentRT(llm=llm, max_tokens=33, temperature=0.5, seed=7).invoke("Hello")
    assert isinstance(msg, AIMessage) and msg.content == "Hi there!"
    assert msg.usage_metadata == {
        "input_tokens": 20, "output_tokens": 4, "total_tokens": 24, "input_token_details": {"cache_read": 12},
    }
    assert msg.response_metadata["model_name"] == "programmable"
    assert msg.response_metadata["finish_reason"] == "stop"
    messages, schema, params = llm.calls[0]
    assert schema is None and messages == [{"role": "user", "content": "Hello"}]
    assert (params.max_tokens, params.temperature, params.seed) == (33, 0.5, 7)


def test_call_options_override_constructor_and_unknown_option_is_named():
    llm = programmed([("ok", "stop")])
    ChatAgentRT(llm=llm, max_tokens=10).invoke("x", max_tokens=5, temperature=0.9)
    assert (llm.calls[0][2].max_tokens, llm.calls[0][2].temperature) == (5, 0.9)
    with pytest.raises(TypeError, match="bogus"):
        ChatAgentRT(llm=programmed([])).invoke("x", bogus=1)


def test_stop_applies_to_text_but_never_inside_constrained_json():
    llm = programmed([("a", "stop"), ("b", "stop"), (json.dumps(CALL), "stop")])
    model = ChatAgentRT(llm=llm, stop=["END"])
    model.invoke("hi")
    model.invoke("hi", stop=["you"])
    model.bind_tools([magic_function], tool_choice="any").invoke("hi", stop=["you"])
    assert [c[2].stop for c in llm.calls] == [["END"], ["you"], []]


def test_stream_text_chunks_last_position_and_single_usage():
    llm = programmed([("Hello, how are you today?", "length")])
    chunks = list(ChatAgentRT(llm=llm).stream("Hello"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == "Hello, how are you today?"
    assert chunks[-1].chunk_position == "last"
    assert [c for c in chunks if c.usage_metadata] == [chunks[-1]]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.response_metadata["finish_reason"] == "length"
    assert full.usage_metadata["input_tokens"] == 11


async def test_astream_break_closes_the_llm_stream():
    llm = programmed([("a long answer that goes on", "stop")])
    async with contextlib.aclosing(ChatAgentRT(llm=llm).astream("Hello")) as stream:
        async for _ in stream:
            break
    for _ in range(10):  # LangChain closes the inner generator via the loop's asyncgen hook
        if llm.closed_early:
            break
        await asyncio.sleep(0.01)
    assert llm.closed_early == 1


def test_sync_stream_break_closes_the_llm_stream():
    llm = programmed([("a long answer that goes on", "stop")])
    gen = ChatAgentRT(llm=llm).stream("Hello")
    next(gen)
    gen.close()
    assert llm.closed_early == 1


async def test_ainvoke_and_abatch():
    llm = ScriptedLLM(["one", "two", "three"])
    model = ChatAgentRT(llm=llm)
    assert (await model.ainvoke("a")).content == "one"
    out = await model.abatch(["b", "c"])
    assert sorted(m.content for m in out) == ["three", "two"]


def test_batch_runs_every_prompt():
    llm = ScriptedLLM([lambda m, s: "re: " + m[-1]["content"]] * 3)
    out = ChatAgentRT(llm=llm).batch(["x", "y", "z"])
    assert [m.content for m in out] == ["re: x", "re: y", "re: z"]


# ---------------------------------------------------------------- messages


def test_message_mapping_tool_calls_errors_and_list_content():
    msgs = [
        SystemMessage("be brief"),
        HumanMessage([{"type": "text", "text": "What is"}, {"type": "text", "text": "1 + 2"}], name="ann"),
        AIMessage(
            [{"type": "text", "text": "let me add"},
             {"type": "tool_use", "id": "abc", "name": "add", "input": {"a": 1}}],
            tool_calls=[{"name": "add", "args": {"a": 1}, "id": "abc", "type": "tool_call"}],
        ),
        ToolMessage("Error: missing b", tool_call_id="abc", status="error"),
        ToolMessage([{"type": "text", "text": "3"}], tool_call_id="abc", name="add"),
    ]
    out = to_agentrt_messages(msgs)
    assert [m.role for m in out] == ["system", "user", "assistant", "tool", "tool"]
    assert out[1].content == "What is\n1 + 2" and out[1].name == "ann"
    assert out[2].content == "let me add" and out[2].tool_calls[0].arguments == {"a": 1}
    assert out[3].is_error and out[3].name == "add"  # name found from the call id
    assert not out[4].is_error and out[4].content == "3"


def test_tool_error_is_shown_to_the_model_as_an_error():
    llm = ScriptedLLM([{"answer": "sorry"}])
    model = ChatAgentRT(llm=llm).bind_tools([magic_function])
    msg = model.invoke([
        HumanMessage("magic of 3?"),
        AIMessage("", tool_calls=[{"name": "magic_function", "args": {"input": 3}, "id": "c1"}]),
        ToolMessage("ValueError: too big", tool_call_id="c1", status="error"),
    ])
    assert msg.content == "sorry" and msg.tool_calls == []
    prompt = json.dumps(llm.calls[0][0])
    assert "Error from magic_function: ValueError: too big" in prompt
    assert '{\\"calls\\":[{\\"tool\\":\\"magic_function\\",\\"arguments\\":{\\"input\\":3}}]}' in prompt


def test_non_text_content_is_a_clear_error():
    with pytest.raises(ValueError, match="'image_url' content block"):
        ChatAgentRT(llm=ScriptedLLM(["x"])).invoke(
            [HumanMessage([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])]
        )


# ---------------------------------------------------------------- tools


def _weather_fn(city: str) -> str:
    """Weather of a city."""
    return "sunny"


class Lookup(BaseModel):
    """Look up a key."""

    key: str


def test_bind_tools_accepts_every_tool_kind_and_constrains_to_them():
    dict_tool = {"type": "function", "function": {"name": "ping", "description": "Ping.",
                                                  "parameters": {"type": "object", "properties": {}}}}
    llm = ScriptedLLM([{"calls": [{"tool": "Lookup", "arguments": {"key": "k"}}]}])
    msg = ChatAgentRT(llm=llm).bind_tools([magic_function, _weather_fn, Lookup, dict_tool]).invoke("go")
    assert msg.tool_calls == [{"name": "Lookup", "args": {"key": "k"}, "id": msg.tool_calls[0]["id"], "type": "tool_call"}]
    assert msg.tool_calls[0]["id"].startswith("call_")
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    schema = json.dumps(_schema_of(llm))
    for name in ("magic_function", "_weather_fn", "Lookup", "ping", "answer"):
        assert f'"{name}"' in schema


@pytest.mark.parametrize(
    ("choice", "called", "may_answer"),
    [(None, {"magic_function", "get_weather"}, True), ("auto", {"magic_function", "get_weather"}, True),
     ("any", {"magic_function", "get_weather"}, False), ("required", {"magic_function", "get_weather"}, False),
     (True, {"magic_function", "get_weather"}, False), ("get_weather", {"get_weather"}, False),
     ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}, False)],
)
def test_tool_choice_shapes_the_grammar(choice, called, may_answer):
    llm = ScriptedLLM([{"calls": [{"tool": "get_weather", "arguments": {"city": "Oslo"}}]}])
    ChatAgentRT(llm=llm).bind_tools([magic_function, get_weather], tool_choice=choice).invoke("hi")
    schema = json.dumps(_schema_of(llm))
    consts = {n for n in ("magic_function", "get_weather") if f'"const": "{n}"' in schema}
    assert consts == called
    assert ('"answer"' in schema) == may_answer


def test_tool_choice_none_gives_free_text():
    llm = ScriptedLLM(["just text"])
    msg = ChatAgentRT(llm=llm).bind_tools([magic_function], tool_choice="none").invoke("hi")
    assert msg.content == "just text" and _schema_of(llm) is None


def test_unknown_tool_choice_names_the_bound_tools():
    with pytest.raises(ValueError, match=r"'nope' is not one of the bound tools \['magic_function'\]"):
        ChatAgentRT(llm=ScriptedLLM([])).bind_tools([magic_function], tool_choice="nope")


def test_parallel_tool_calls_flag_reaches_the_grammar():
    two = {"calls": [{"tool": "get_weather", "arguments": {"city": "A"}},
                     {"tool": "get_weather", "arguments": {"city": "B"}}]}
    llm = ScriptedLLM([two, CALL])
    model = ChatAgentRT(llm=llm)
    msg = model.bind_tools([get_weather, magic_function]).invoke("weather in A and B")
    assert [c["args"]["city"] for c in msg.tool_calls] == ["A", "B"]
    assert len({c["id"] for c in msg.tool_calls}) == 2
    model.bind_tools([magic_function], parallel_tool_calls=False).invoke("x")
    assert '"maxItems": 1' in json.dumps(_schema_of(llm)) and '"maxItems"' not in json.dumps(_schema_of(llm, 0))


def test_stream_tool_call_chunks_add_up_to_the_calls():
    two = {"calls": [{"tool": "get_weather", "arguments": {"city": "Zürich \"Z\""}},
                     {"tool": "magic_function", "arguments": {"input": 3}}]}
    llm = ScriptedLLM([two, two])
    model = ChatAgentRT(llm=llm).bind_tools([get_weather, magic_function])
    invoked = model.invoke("x")
    chunks = list(model.stream("x"))
    assert any(c.tool_call_chunks for c in chunks[:-1]) and len(chunks) > 3
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    assert all(c["id"].startswith("call_") for c in full.tool_calls)
    assert full.response_metadata["finish_reason"] == "tool_calls"
    assert full.invalid_tool_calls == []


@pytest.mark.parametrize("chars_per_delta", [1, 1000])
def test_stream_whole_calls_in_one_delta_still_aggregate(chars_per_delta):
    """The engine sends forced tokens in bulk: a call's start and arguments (even two
    calls) can arrive in one delta."""
    two = json.dumps({"calls": [{"tool": "get_weather", "arguments": {"city": "Oslo"}},
                                {"tool": "magic_function", "arguments": {}}]}, separators=(",", ":"))

    bulk = ScriptedLLM([Completion(text=two, finish_reason="stop")], chunk_chars=chars_per_delta)
    model = ChatAgentRT(llm=bulk).bind_tools([get_weather, magic_function])
    full = None
    for c in model.stream("x"):
        full = c if full is None else full + c
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Oslo"}), ("magic_function", {})]
    assert all(c["id"].startswith("call_") for c in full.tool_calls)


async def test_astream_answer_in_tools_mode_streams_unescaped_content():
    llm = ScriptedLLM([{"answer": "It is \"sunny\"\nand warm"}])
    chunks = [c async for c in ChatAgentRT(llm=llm).bind_tools([get_weather]).astream("weather?")]
    assert "".join(c.content for c in chunks) == 'It is "sunny"\nand warm'
    assert sum(len(c.tool_call_chunks) for c in chunks) == 0


def test_cut_output_keeps_the_complete_calls_like_streaming():
    """A model repeating calls until max_tokens: invoke and stream agree on the calls that
    closed, and both say the output was cut."""
    text = '{"calls":[{"tool":"magic_function","arguments":{"input":3}},{"tool":"magic_function","arguments":{"input":3}},{"tool":"magic_fun'
    model = ChatAgentRT(llm=programmed([(text, "length")] * 2), max_tokens=40).bind_tools([magic_function])
    msg = model.invoke("x")
    assert [c["args"] for c in msg.tool_calls] == [{"input": 3}, {"input": 3}]
    assert "raise max_tokens (was 40)" in msg.invalid_tool_calls[0]["error"]
    full = None
    for c in model.stream("x"):
        full = c if full is None else full + c
    assert [c["args"] for c in full.tool_calls] == [{"input": 3}, {"input": 3}]
    assert full.response_metadata["finish_reason"] == msg.response_metadata["finish_reason"] == "length"


def test_output_cut_by_max_tokens_becomes_an_invalid_tool_call():
    llm = programmed([('{"calls":[{"tool":"magic_function","argu', "length")] * 2)
    model = ChatAgentRT(llm=llm, max_tokens=12).bind_tools([magic_function], tool_choice="any")
    msg = model.invoke("x")
    assert msg.tool_calls == [] and len(msg.invalid_tool_calls) == 1
    assert "raise max_tokens (was 12)" in msg.invalid_tool_calls[0]["error"]
    assert msg.response_metadata["finish_reason"] == "length"
    full = None
    for c in model.stream("x"):
        full = c if full is None else full + c
    # Streamed chunks cannot be taken back (as with any OpenAI-style stream cut by length):
    # the aggregate says why in response_metadata.
    assert "raise max_tokens (was 12)" in full.response_metadata["parse_error"]
    assert full.response_metadata["finish_reason"] == "length"


# ---------------------------------------------------------------- structured output


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize("kind", ["pydantic", "typeddict", "dict"])
def test_with_structured_output_every_method_and_schema_kind(method, kind):
    schema = {"pydantic": Joke, "typeddict": JokeDict, "dict": Joke.model_json_schema()}[kind]
    reply = {"calls": [{"tool": "Joke" if kind != "typeddict" else "JokeDict", "arguments": JOKE}]} \
        if method == "function_calling" else JOKE
    llm = ScriptedLLM([reply, reply])
    chat = ChatAgentRT(llm=llm).with_structured_output(schema, method=method)
    out = chat.invoke("Tell me a joke about cats.")
    if kind == "pydantic":
        assert out == Joke(**JOKE)
    else:
        assert out == JOKE
    sent = json.dumps(_schema_of(llm))
    assert '"setup"' in sent and '"punchline"' in sent and '"answer"' not in sent
    streamed = list(chat.stream("again"))
    assert streamed and streamed[-1] == out


def test_structured_output_include_raw_and_json_mode_without_schema():
    llm = ScriptedLLM([JOKE, {"x": 1}])
    out = ChatAgentRT(llm=llm).with_structured_output(Joke, include_raw=True).invoke("joke")
    assert isinstance(out["raw"], AIMessage) and out["parsed"] == Joke(**JOKE) and out["parsing_error"] is None
    free = ChatAgentRT(llm=llm).with_structured_output(None, method="json_mode").invoke("any json")
    assert free == {"x": 1} and _schema_of(llm) == {"type": "object"}


def test_structured_output_bad_method_is_named():
    with pytest.raises(ValueError, match="method must be"):
        ChatAgentRT(llm=ScriptedLLM([])).with_structured_output(Joke, method="xml")


# ---------------------------------------------------------------- retries and timeouts


def test_transient_failures_are_retried():
    llm = programmed([ConnectionError("reset"), ("fine", "stop")])
    assert ChatAgentRT(llm=llm, max_retries=1).invoke("x").content == "fine"
    assert len(llm.calls) == 2


def test_bad_input_is_not_retried():
    llm = programmed([ValueError("prompt too long"), ("never", "stop")])
    with pytest.raises(ValueError, match="prompt too long"):
        ChatAgentRT(llm=llm, max_retries=3).invoke("x")
    assert len(llm.calls) == 1


def test_client_errors_are_not_retried_but_rate_limits_are():
    class HTTPError(Exception):
        def __init__(self, status_code: int):
            super().__init__(f"HTTP {status_code}")
            self.status_code = status_code

    llm = programmed([HTTPError(401), ("never", "stop")])
    with pytest.raises(HTTPError, match="401"):
        ChatAgentRT(llm=llm, max_retries=3).invoke("x")
    assert len(llm.calls) == 1
    llm = programmed([HTTPError(429), HTTPError(503), ("third time", "stop")])
    assert ChatAgentRT(llm=llm, max_retries=2).invoke("x").content == "third time"


def test_timeout_cancels_then_gives_up_after_retries():
    llm = programmed([("sleep", 5), ("sleep", 5)])
    with pytest.raises(TimeoutError):
        ChatAgentRT(llm=llm, timeout=0.05, max_retries=1).invoke("x")
    assert len(llm.calls) == 2


async def test_stream_timeout_then_success():
    llm = programmed([("sleep", 5), ("after retry", "stop")])
    chunks = [c async for c in ChatAgentRT(llm=llm, timeout=0.05, max_retries=1).astream("x")]
    assert "".join(c.content for c in chunks) == "after retry"


def test_streaming_flag_makes_invoke_stream():
    llm = programmed([("streamed", "stop")])
    tokens: list[str] = []
    from langchain_core.callbacks import BaseCallbackHandler

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token, **kwargs):
            tokens.append(token)

    msg = ChatAgentRT(llm=llm, streaming=True).invoke("x", config={"callbacks": [Collect()]})
    assert msg.content == "streamed" and "".join(tokens) == "streamed" and len(tokens) > 1


def test_per_call_model_cannot_switch_an_injected_llm():
    llm = ScriptedLLM(["a", "b"])
    model = ChatAgentRT(llm=llm)
    assert model.invoke("x", model="scripted").response_metadata["model_name"] == "scripted"
    with pytest.raises(ValueError, match="serves one model"):
        model.invoke("x", model="other-model")
