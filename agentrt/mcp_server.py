"""agentrt as an MCP server: a registry's tools, and ``agent_run`` (the whole planner on the local model).

`build_mcp_server` makes an MCP server (the official SDK's low-level ``Server``) that lists each tool
with its JSON Schema and runs calls through the registry, so arguments are validated and failures
come back as error results; ``agent_run`` answers a task with an `Agent` over the same tools. The
model behind ``agent_run`` is built on its first call (listing and calling plain tools never loads
it). `agentrt mcp` serves it over stdio or streamable HTTP. Needs the ``mcp`` extra.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, Callable

import anyio

from agentrt.llm import LLM, GenerationParams
from agentrt.planner import Agent
from agentrt.registry import ToolRegistry
from agentrt.types import RunResult, ToolCall

__all__ = ["AGENT_RUN", "LazyLLM", "build_mcp_server"]

AGENT_RUN = "agent_run"
AGENT_RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task": {"type": "string", "minLength": 1, "description": "the question or task, in plain words"},
        "max_steps": {"type": "integer", "minimum": 1, "maximum": 32,
                      "description": "the most model turns (default: the server's setting)"},
    },
    "required": ["task"],
    "additionalProperties": False,
}


class LazyLLM:
    """An LLM built by ``factory`` on first use (in a worker thread: it can take seconds), then shared."""

    def __init__(self, factory: Callable[[], LLM]):
        self._factory = factory
        self._llm: LLM | None = None
        self._lock = anyio.Lock()

    async def get(self) -> LLM:
        async with self._lock:
            if self._llm is None:
                self._llm = await anyio.to_thread.run_sync(self._factory)
            return self._llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()


def build_mcp_server(registry: ToolRegistry, llm: LazyLLM | None = None, *, name: str = "agentrt",
                     max_steps: int = 8, max_tokens: int = 256, tool_choice: str = "required") -> Any:
    """An MCP ``Server`` offering ``registry``'s tools, and ``agent_run`` when ``llm`` is given.

    ``max_steps``, ``max_tokens`` and ``tool_choice`` set the agent of ``agent_run`` (its first step;
    the planner then lets the model answer).
    """
    from mcp import types
    from mcp.server.lowlevel import Server
    from mcp.shared.exceptions import MCPError

    listed = [types.Tool(name=t.name, description=t.description, input_schema=t.spec.parameters) for t in registry]
    if llm is not None:
        listed.append(types.Tool(
            name=AGENT_RUN, input_schema=AGENT_RUN_SCHEMA,
            description=f"Answer a task with agentrt's agent: a local model that calls these tools "
                        f"({', '.join(registry.names) or 'none'}) step by step, each call grammar-constrained."))

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        arguments = params.arguments or {}
        if params.name == AGENT_RUN and llm is not None:
            return await _agent_run(arguments)
        if params.name not in registry:  # the spec's answer to an unknown tool: a protocol error, not a result
            known = ", ".join(t.name for t in listed)
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {params.name!r}; this server has: {known}")
        result = await registry.call(ToolCall(id=f"mcp_{secrets.token_hex(6)}", name=params.name,
                                              arguments=arguments))
        return types.CallToolResult(content=[types.TextContent(text=result.content)], is_error=result.is_error)

    async def _agent_run(arguments: dict[str, Any]) -> types.CallToolResult:
        problem = _agent_run_problem(arguments)
        if problem:
            return types.CallToolResult(content=[types.TextContent(text=problem)], is_error=True)
        agent = Agent(await llm.get(), registry, tool_choice=tool_choice, parallel_tool_calls=False,
                      max_steps=arguments.get("max_steps", max_steps),
                      params=GenerationParams(max_tokens=max_tokens))
        result = await agent.run(arguments["task"])
        return types.CallToolResult(content=[types.TextContent(text=_answer_text(result))],
                                    structured_content=_run_summary(result), is_error=result.status != "completed")

    return Server(name, instructions="Tools of an agentrt runtime; agent_run answers a whole task with its agent.",
                  on_list_tools=list_tools, on_call_tool=call_tool)


def _agent_run_problem(arguments: dict[str, Any]) -> str | None:
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(AGENT_RUN_SCHEMA).iter_errors(arguments), key=str)
    return "ValidationError: " + "; ".join(e.message for e in errors) if errors else None


def _answer_text(result: RunResult) -> str:
    if result.status != "completed":
        return f"the agent stopped ({result.status}): {result.error}"
    answer = result.answer
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False, default=str)


def _run_summary(result: RunResult) -> dict[str, Any]:
    """What a calling agent may want besides the answer: the status and each tool call made."""
    return {
        "status": result.status,
        "answer": result.answer,
        "error": result.error,
        "steps": len(result.steps),
        "tool_calls": [{"tool": c.name, "arguments": c.arguments, "result": r.content, "is_error": r.is_error}
                       for s in result.steps for c, r in zip(s.calls, s.results)],
    }

