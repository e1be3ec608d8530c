"""A LangGraph ReAct agent (``create_react_agent``) running on ChatAgentRT.

The graph alternates model turns and tool runs until the model answers; ChatAgentRT
makes every tool call grammar-valid, and the engine's prefix cache serves the growing
transcript of each step. Tools: an agentrt registry tool (via `to_langchain_tool`) and
a LangChain ``@tool``.

    python examples/langgraph_react_agent.py "What is 6 times 7?"
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.prebuilt import create_react_agent

from agentrt.langchain import ChatAgentRT, to_langchain_tool
from agentrt.registry import ToolRegistry

registry = ToolRegistry()


@registry.tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 C in {city}."


def build_agent(model: str | None = None, llm: Any = None) -> Any:
    """The compiled LangGraph agent on ChatAgentRT with both tools (``llm``: any agentrt
    LLM, e.g. ScriptedLLM, to use instead of the engine)."""
    chat = ChatAgentRT(model=model, llm=llm, max_tokens=96)
    with warnings.catch_warnings():
        # LangGraph 1.x points to langchain's create_agent (the same graph, in the
        # `langchain` package, which this example does not need).
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_react_agent(chat, [to_langchain_tool(registry.get("multiply")), get_weather])


def run(question: str, model: str | None = None, verbose: bool = True, llm: Any = None) -> dict[str, Any]:
    """Run the agent on ``question``; returns LangGraph's final state (``messages``)."""
    agent = build_agent(model, llm)
    state = agent.invoke({"messages": [("user", question)]}, config={"recursion_limit": 8})
    if verbose:
        for msg in state["messages"]:
            if isinstance(msg, AIMessage) and msg.tool_calls:
                for call in msg.tool_calls:
                    print(f"call {call['name']}({call['args']})")
            elif isinstance(msg, ToolMessage):
                print(f"  -> {msg.content}")
        print(f"answer: {state['messages'][-1].content}")
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is 6 times 7?")
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    args = parser.parse_args(argv)
    run(args.question, model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
