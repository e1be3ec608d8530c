"""A scripted LLM for tests and examples: plays back prepared outputs in order."""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import anyio

from agentrt.llm import ChatMessage, Completion, CompletionChunk, GenerationParams
from agentrt.types import Usage

Reply = (
    str
    | dict[str, Any]
    | list[Any]
    | Callable[[list[ChatMessage], dict[str, Any] | None], str | Awaitable[str]]
)


def _prompt_text(messages: list[ChatMessage]) -> str:
    return "".join(f"<{m.get('role')}>{m.get('content') or ''}</>" for m in messages)


class ScriptedLLM:
    """Implements the `LLM` protocol by returning ``replies`` one per call.

    A reply is a string (returned as is), a dict/list (returned as compact JSON) or a
    callable ``(messages, json_schema) -> str`` (sync or async). Every call is recorded in
    ``calls`` so a test can check what the model was shown. ``delay_s`` sleeps before each
    reply (to test timeouts). Usage counts ~4 characters a token; ``cached_tokens`` is the
    part of the prompt shared with the previous call's prompt + reply, the way a prefix
    cache would serve an append-only transcript.
    """

    model_name = "scripted"

    def __init__(self, replies: Sequence[Reply], *, delay_s: float = 0.0):
        self._replies = list(replies)
        self.delay_s = delay_s
        self.calls: list[tuple[list[ChatMessage], dict[str, Any] | None]] = []
        self._last_seen = ""  # previous prompt + reply, as text

    async def _next(self, messages: list[ChatMessage], json_schema: dict[str, Any] | None) -> str:
        self.calls.append((messages, json_schema))
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        if not self._replies:
            raise RuntimeError("ScriptedLLM ran out of replies")
        reply = self._replies.pop(0)
        if callable(reply):
            out = reply(messages, json_schema)
            return await out if inspect.isawaitable(out) else out
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
        text = await self._next(messages, json_schema)
        prompt = _prompt_text(messages)
        shared = len(os.path.commonprefix([prompt, self._last_seen]))
        self._last_seen = prompt + text
        return Completion(
            text=text,
            finish_reason="stop",
            usage=Usage(
                prompt_tokens=len(prompt) // 4,
                completion_tokens=max(1, len(text) // 4),
                cached_tokens=shared // 4,
            ),
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
