"""A scripted LLM for tests and examples: plays back prepared outputs in order."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable, Sequence

from agentrt.llm import ChatMessage, Completion, CompletionChunk, GenerationParams
from agentrt.types import Usage

Reply = str | dict[str, Any] | list[Any] | Callable[[list[ChatMessage], dict[str, Any] | None], str]


class ScriptedLLM:
    """Implements the `LLM` protocol by returning ``replies`` one per call.

    A reply is a string (returned as is), a dict/list (returned as compact JSON) or a
    callable ``(messages, json_schema) -> str``. Every call is recorded in ``calls`` so a
    test can check what the model was shown.
    """

    model_name = "scripted"

    def __init__(self, replies: Sequence[Reply]):
        self._replies = list(replies)
        self.calls: list[tuple[list[ChatMessage], dict[str, Any] | None]] = []

    def _next(self, messages: list[ChatMessage], json_schema: dict[str, Any] | None) -> str:
        self.calls.append((messages, json_schema))
        if not self._replies:
            raise RuntimeError("ScriptedLLM ran out of replies")
        reply = self._replies.pop(0)
        if callable(reply):
            return reply(messages, json_schema)
        if isinstance(reply, str):
            return reply
        return json.dumps(reply, separators=(",", ":"))

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> Completion:
        text = self._next(messages, json_schema)
        prompt_tokens = sum(len(m.get("content") or "") for m in messages) // 4
        return Completion(
            text=text,
            finish_reason="stop",
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=max(1, len(text) // 4)),
        )

    async def stream(
        self,
        messages: list[ChatMessage],
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        completion = await self.complete(messages, json_schema=json_schema, params=params)
        text = completion.text
        for i in range(0, len(text), 4):
            yield CompletionChunk(delta=text[i : i + 4])
        yield CompletionChunk(completion=completion)
