"""Tool interop: agentrt registry tools as LangChain tools and LangChain tools in the registry."""
from __future__ import annotations

import pytest

pytest.importorskip("langchain_core", reason="langchain-core (the 'langchain' extra) is not installed")

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.tools import tool as lc_tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from agentrt.langchain import ChatAgentRT, LangChainTool, from_langchain_tool, to_langchain_tool
from agentrt.registry import RunContext, ToolRegistry
from agentrt.testing import ScriptedLLM
from agentrt.types import ToolCall


def _registry_tools() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        return a + b

    @reg.tool
    async def greet(ctx: RunContext[str], name: str) -> str:
        """Greet someone (uses the injected context)."""
        return f"hello {name} from {ctx.deps or 'nobody'}"

    @reg.tool
    def fail(x: int) -> int:
        """Always fails."""
        raise RuntimeError(f"cannot handle {x}")

    return reg


def test_registry_tool_as_langchain_tool_invokes_and_validates():
    reg = _registry_tools()
    add = to_langchain_tool(reg.get("add"))
    assert isinstance(add, BaseTool)
    assert add.name == "add" and "Add two integers" in add.description
    params = convert_to_openai_tool(add)["function"]["parameters"]
    assert params["required"] == ["a", "b"] and params["properties"]["a"]["type"] == "integer"
    assert add.invoke({"a": 2, "b": 3}) == "5"
    # bad arguments: the registry's validation error comes back as an error ToolMessage
    msg = add.invoke({"name": "add", "args": {"a": "x"}, "id": "c1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage) and msg.status == "error"
    assert "a" in msg.content and "b" in msg.content  # names both bad/missing fields


async def test_registry_tool_as_langchain_tool_async_context_and_errors():
    reg = _registry_tools()
    greet = to_langchain_tool(reg.get("greet"))
    # the RunContext parameter stays out of the LangChain schema and is injected
    assert list(convert_to_openai_tool(greet)["function"]["parameters"]["properties"]) == ["name"]
    assert await greet.ainvoke({"name": "Ada"}) == "hello Ada from nobody"
    fail = to_langchain_tool(reg.get("fail"))
    msg = await fail.ainvoke({"name": "fail", "args": {"x": 7}, "id": "c2", "type": "tool_call"})
    assert msg.status == "error" and "cannot handle 7" in msg.content


class _Weather(BaseModel):
    city: str = Field(description="city name")
    unit: str = Field(default="C", description="C or F")


@lc_tool(args_schema=_Weather)
def get_weather(city: str, unit: str = "C") -> dict:
    """Get the current weather in a city."""
    return {"city": city, "temp": 21, "unit": unit}


async def test_langchain_tool_in_registry_calls_and_validates():
    t = from_langchain_tool(get_weather)
    assert isinstance(t, LangChainTool)
    reg = ToolRegistry()
    reg.register(t)
    assert reg.names == ["get_weather"]
    spec = reg.specs()[0]
    assert spec.description.startswith("Get the current weather")
    assert spec.parameters["required"] == ["city"]
    ok = await reg.call(ToolCall(id="1", name="get_weather", arguments={"city": "Oslo"}))
    assert not ok.is_error and '"temp": 21' in ok.content and '"city": "Oslo"' in ok.content
    bad = await reg.call(ToolCall(id="2", name="get_weather", arguments={"unit": "F"}))
    assert bad.is_error and "city" in bad.content


async def test_langchain_tool_errors_become_error_results():
    def explode(n: int) -> int:
        """Explodes."""
        raise ValueError(f"boom {n}")

    reg = ToolRegistry([from_langchain_tool(StructuredTool.from_function(explode))])
    res = await reg.call(ToolCall(id="1", name="explode", arguments={"n": 4}))
    assert res.is_error and "boom 4" in res.content


async def test_dict_schema_langchain_tool_round_trip():
    schema = {
        "title": "lookup",
        "description": "Look a key up.",
        "type": "object",
        "properties": {"key": {"type": "string"}},
        "required": ["key"],
    }
    lct = StructuredTool(name="lookup", description="Look a key up.", args_schema=schema,
                         coroutine=lambda key: _echo(key))
    t = from_langchain_tool(lct)
    reg = ToolRegistry([t])
    assert (await reg.call(ToolCall(id="1", name="lookup", arguments={"key": "k1"}))).content == "value of k1"
    bad = await reg.call(ToolCall(id="2", name="lookup", arguments={"key": 3}))
    assert bad.is_error and "string" in bad.content


async def _echo(key: str) -> str:
    return f"value of {key}"


def test_one_tool_set_serves_both_sides():
    """A registry tool converted to LangChain and back keeps its schema and behaviour,
    and binds to ChatAgentRT with that schema."""
    reg = _registry_tools()
    lc_add = to_langchain_tool(reg.get("add"))
    back = from_langchain_tool(lc_add)
    assert back.spec.parameters["properties"].keys() == reg.get("add").spec.parameters["properties"].keys()
    llm = ScriptedLLM([{"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}}]}])
    msg = ChatAgentRT(llm=llm).bind_tools([lc_add], tool_choice="add").invoke("1+2?")
    assert msg.tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert lc_add.invoke(msg.tool_calls[0]).content == "3"
    sent_schema = llm.calls[0][1]
    assert "add" in str(sent_schema) and '"integer"' in str(sent_schema).replace("'", '"')
