"""A scripted LLM for tests and examples: plays back prepared outputs in order."""
from __future__ import annotations

import inspect
import os
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, Sequence

import anyio

from agentrt.prompting import compact_json
from agentrt.protocol import (BaseLLM, ChatMessage, Completion, CompletionChunk, GenerationParams, Prompt,
                              final_completion, prompt_messages)
from agentrt.types import Usage

Reply = (
    str
    | dict[str, Any]
    | list[Any]
    | Completion
    | BaseException
    | Callable[[list[ChatMessage], dict[str, Any] | None], str | Awaitable[str]]
)


class ScriptedCall(NamedTuple):
    """What one call was given."""

    messages: list[ChatMessage]
    json_schema: dict[str, Any] | None
    params: GenerationParams | None


def _prompt_text(messages: list[ChatMessage]) -> str:
    return "".join(f"<{m.get('role')}>{m.get('content') or ''}</>" for m in messages)


class ScriptedLLM(BaseLLM):
    """Implements the `LLM` protocol by returning ``replies`` one per call.

    A reply is a string (returned as is), a dict/list (returned as compact JSON), a `Completion`
    (returned as is: e.g. one cut with finish_reason "length"), an exception (raised when the call
    starts) or a callable ``(messages, json_schema) -> str`` (sync or async). ``fallback`` answers
    the calls after the replies run out (default: raise). Every call is recorded in ``calls``
    (`ScriptedCall`) so a test can check what the model was shown.

    ``delay_s`` sleeps before each reply (to test timeouts); a stream sends ``chunk_chars``
    characters per chunk, ``chunk_delay_s`` apart. ``started``, ``finished`` and ``closed_early``
    count streams. Usage is ``usage`` when given, else ~4 characters a token, with
    ``cached_tokens`` the part of the prompt shared with the previous call's prompt + reply, the
    way a prefix cache would serve an append-only transcript.
    """

    def __init__(self, replies: Sequence[Reply], *, delay_s: float = 0.0, fallback: Reply | None = None,
                 chunk_chars: int = 4, chunk_delay_s: float = 0.0, usage: Usage | None = None,
                 model_name: str = "scripted"):
        self._replies = list(replies)
        self.fallback = fallback
        self.delay_s = delay_s
        self.chunk_chars, self.chunk_delay_s = chunk_chars, chunk_delay_s
        self.usage = usage
        self.model_name = model_name
        self.calls: list[ScriptedCall] = []
        self.started = self.finished = self.closed_early = 0
        self._last_seen = ""  # previous prompt + reply, as text

    async def _next(self, messages: list[ChatMessage], json_schema: dict[str, Any] | None) -> str | Completion:
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        if self._replies:
            reply = self._replies.pop(0)
        elif self.fallback is not None:
            reply = self.fallback
        else:
            raise RuntimeError("ScriptedLLM ran out of replies")
        if isinstance(reply, BaseException):
            raise reply
        if callable(reply):
            out = reply(messages, json_schema)
            return await out if inspect.isawaitable(out) else out
        if isinstance(reply, (str, Completion)):
            return reply
        return compact_json(reply)

    async def complete(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> Completion:
        return await final_completion(self.stream(messages, json_schema=json_schema, params=params))

    async def stream(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        self.started += 1
        done = False
        try:
            completion = await self._completion(prompt_messages(messages), json_schema, params)
            text, n = completion.text, self.chunk_chars
            for i in range(0, len(text), n):
                if self.chunk_delay_s:
                    await anyio.sleep(self.chunk_delay_s)
                yield CompletionChunk(delta=text[i : i + n])
            done = True
            self.finished += 1
            yield CompletionChunk(completion=completion)
        finally:
            if not done:
                self.closed_early += 1

    async def _completion(self, messages: list[ChatMessage], json_schema: dict[str, Any] | None,
                          params: GenerationParams | None) -> Completion:
        self.calls.append(ScriptedCall(messages, json_schema, params))
        reply = await self._next(messages, json_schema)
        if isinstance(reply, Completion):
            return reply
        prompt = _prompt_text(messages)
        shared = len(os.path.commonprefix([prompt, self._last_seen]))
        self._last_seen = prompt + reply
        usage = self.usage or Usage(prompt_tokens=len(prompt) // 4, completion_tokens=max(1, len(reply) // 4),
                                    cached_tokens=shared // 4)
        return Completion(text=reply, finish_reason="stop", usage=usage)
