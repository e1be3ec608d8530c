"""A plain LangChain tool-calling loop on ChatAgentRT (the embedded model, in-process).

One set of tools serves both worlds: ``multiply`` is an agentrt registry tool turned into
a LangChain tool with `to_langchain_tool`; ``get_weather`` is an ordinary LangChain
``@tool``. The model's tool calls are grammar-constrained, so their arguments always
validate against the tools' schemas.

    python examples/langchain_tool_loop.py "What is 12.5 times 4?"
    python examples/langchain_tool_loop.py --model /path/to/model "What is the weather in Paris?"
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool, tool

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


TOOLS: list[BaseTool] = [to_langchain_tool(registry.get("multiply")), get_weather]


def run(question: str, model: str | None = None, max_steps: int = 4, verbose: bool = True,
        llm: Any = None) -> list[BaseMessage]:
    """Ask ``question``; call tools until the model answers (or ``max_steps`` model turns).
    Returns the whole transcript; its last message is the model's answer. ``llm`` puts
    any agentrt LLM (e.g. ScriptedLLM) behind the chat model instead of the engine."""
    by_name = {t.name: t for t in TOOLS}
    base = ChatAgentRT(model=model, llm=llm, max_tokens=96)
    # Small models tend to answer from memory: force a tool call on the first turn
    # ("any": the grammar only allows calls), then let the model choose ("auto").
    first, later = base.bind_tools(TOOLS, tool_choice="any"), base.bind_tools(TOOLS)
    messages: list[BaseMessage] = [
        SystemMessage("Use a tool when it helps, then answer in one sentence."),
        HumanMessage(question),
    ]
    for step in range(max_steps):
        ai = (first if step == 0 else later).invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            result = by_name[call["name"]].invoke(call)  # a ToolMessage answering this call id
            if verbose:
                print(f"tool {call['name']}({call['args']}) -> {result.content}")
            messages.append(result)
    if verbose:
        last = messages[-1]
        if not isinstance(last, AIMessage) or last.tool_calls:
            print(f"no answer within {max_steps} model turns")
            return messages
        usage = last.usage_metadata
        print(f"answer: {last.content}")
        if usage:
            print(f"(last turn: {usage['input_tokens']} prompt tokens, "
                  f"{usage['input_token_details'].get('cache_read', 0)} from the prefix cache)")
    return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is 12.5 times 4?")
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    args = parser.parse_args(argv)
    run(args.question, model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
