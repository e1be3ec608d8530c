"""Test doubles for the LangChain adapter tests: LLMs that fail, stall or get cut off."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from agentrt.llm import ChatMessage, Completion, CompletionChunk, GenerationParams
from agentrt.types import Usage


class ProgrammableLLM:
    """An `LLM` whose calls follow a plan: each entry is an Exception to raise, a
    ``("sleep", seconds)`` stall, or a ``(text, finish_reason)`` result. Records every
    call's (messages, json_schema, params) and how many streams were closed early."""

    model_name = "programmable"

    def __init__(self, plan: list[Any], usage: Usage | None = None):
        self.plan = list(plan)
        self.calls: list[tuple[list[ChatMessage], dict[str, Any] | None, GenerationParams | None]] = []
        self.usage = usage or Usage(prompt_tokens=11, completion_tokens=5, cached_tokens=7)
        self.closed_early = 0

    async def _next(self, messages, json_schema, params) -> tuple[str, str]:
        self.calls.append((messages, json_schema, params))
        step = self.plan.pop(0)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, tuple) and step[0] == "sleep":
            await asyncio.sleep(step[1])
            return "late", "stop"
        return step

    async def complete(self, messages, *, json_schema=None, params=None) -> Completion:
        text, finish = await self._next(messages, json_schema, params)
        return Completion(text=text, finish_reason=finish, usage=self.usage)

    async def stream(self, messages, *, json_schema=None, params=None) -> AsyncIterator[CompletionChunk]:
        text, finish = await self._next(messages, json_schema, params)
        done = False
        try:
            for i in range(0, len(text), 3):
                yield CompletionChunk(delta=text[i : i + 3])
            done = True
            yield CompletionChunk(completion=Completion(text=text, finish_reason=finish, usage=self.usage))
        finally:
            if not done:
                self.closed_early += 1
