"""An agent on the embedded model that uses a real MCP server's tools beside a Python tool.

    pip install 'agentrt[mcp]' mcp-server-time
    python examples/mcp_time_agent.py

`mcp-server-time` (an MCP reference server from PyPI) is started over stdio; its `get_current_time`
joins the agent with its own JSON Schema, so the model's call is grammar-constrained like any @tool.
"""
from __future__ import annotations

import sys

from agentrt.llm import LocalLLM
from agentrt.mcp_client import MCPClient
from agentrt.planner import Agent
from agentrt.registry import Tool


def days_until_weekend(day_of_week: str) -> int:
    """How many days from the given weekday (e.g. 'Tuesday') to Saturday."""
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    return (5 - days.index(day_of_week.capitalize())) % 7


def main() -> None:
    server = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
    with MCPClient(server, name="time") as time_server, LocalLLM() as llm:
        get_time = next(t for t in time_server.tools if t.name == "get_current_time")
        agent = Agent(llm, [get_time, Tool.from_function(days_until_weekend)], tool_choice="get_current_time",
                      parallel_tool_calls=False, max_steps=4)
        result = agent.run_sync("What time is it in Europe/Paris right now?")
        for step in result.steps:
            for call, reply in zip(step.calls, step.results):
                print(f"called {call.name}({call.arguments}) -> {reply.content}")
        print(f"{result.status}: {result.answer if result.status == 'completed' else result.error}")


if __name__ == "__main__":
    main()
