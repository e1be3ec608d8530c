"""Holding a generation while a client waits: its first chunk (so input errors are still a
4xx), its end, cancelling it when the client leaves, reading it as the turn's events (what
both streamed APIs, chat chunks and Responses events, are written from), and Server-Sent
Events framing."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from agentrt.llm import Completion, CompletionChunk, final_completion
from agentrt.prompting import PromptPlan
from agentrt.server.errors import APIError, ClientDisconnected, known_llm_error
from agentrt.stream_parser import StreamEvent, ToolCallStart, ToolCallStreamParser


async def first_chunk(stream: AsyncIterator[CompletionChunk]) -> CompletionChunk | None:
    """Start a generation and wait for its first chunk, so that input errors (schema,
    context window) still become a 4xx before any byte of the response is sent."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as e:
        err = known_llm_error(e)
        if err is None:
            raise
        raise err from None


async def resumed(stream: AsyncIterator[CompletionChunk], first: CompletionChunk | None
                  ) -> AsyncIterator[CompletionChunk]:
    """The stream again from the start: ``first`` (already read), then the rest."""
    if first is not None:
        yield first
    async for chunk in stream:
        yield chunk


async def drain(stream: AsyncIterator[CompletionChunk], first: CompletionChunk | None) -> Completion:
    """The `Completion` at the end of a stream whose first chunk was already read."""
    try:
        return await final_completion(resumed(stream, first))
    except RuntimeError:  # final_completion: the stream ended without one
        raise APIError(502, "the model stream ended without a completion", type="server_error") from None


@dataclass(frozen=True)
class TurnEnd:
    """A streamed turn ended: its completion and finish reason ("stop", "length" or "tool_calls")."""

    completion: Completion
    finish: str


@dataclass(frozen=True)
class TurnFailed:
    """A streamed turn cannot go on: why, and the error code to send (the stream's last words)."""

    message: str
    code: str = "model_output_invalid"


async def turn_events(plan: PromptPlan, stream: AsyncIterator[CompletionChunk], first: CompletionChunk | None
                      ) -> AsyncIterator[StreamEvent | TurnEnd | TurnFailed]:
    """The parser's events of a generation whose first chunk was already read, as they come, then one
    `TurnEnd`, or a `TurnFailed` as the last item when the output does not parse or the engine fails."""
    parser = ToolCallStreamParser(plan.mode)
    made_calls = False
    completion: Completion | None = None
    try:
        async for chunk in resumed(stream, first):
            try:
                events = parser.feed(chunk.delta) if chunk.delta else []
            except ValueError as e:  # output the grammar should not have let through
                yield TurnFailed(f"the model's output did not parse: {e}")
                return
            for ev in events:
                made_calls = made_calls or isinstance(ev, ToolCallStart)
                yield ev
            completion = chunk.completion or completion
    except Exception as e:  # noqa: BLE001 - this request failed in the engine: end its own stream with the reason
        yield TurnFailed(f"generation failed: {type(e).__name__}: {e}", code="generation_failed")
        return
    if completion is None:
        yield TurnFailed("the model stream ended without a completion")
        return
    finish = "length" if completion.finish_reason == "length" else "stop"
    if finish == "stop" and plan.mode == "tools":
        try:
            events = parser.finish()
        except ValueError as e:
            yield TurnFailed(f"the model's output did not parse: {e}")
            return
        for ev in events:
            made_calls = made_calls or isinstance(ev, ToolCallStart)
            yield ev
        if made_calls:
            finish = "tool_calls"
    yield TurnEnd(completion, finish)


async def close(stream: Any) -> None:
    """Close a generation's stream, which aborts it in the engine (frees its KV blocks).
    Shielded: it must happen even while a disconnect is cancelling the surrounding task."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await stream.aclose()


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Await ``work()``, cancelling it if the client disconnects first (so an abandoned
    request stops generating and frees its KV blocks instead of running to the end)."""
    result: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(0.25)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        result.append(await work())
        tg.cancel_scope.cancel()
    if not result:
        raise ClientDisconnected
    return result[0]


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event: optional ``event:`` line, ``data:`` JSON (or a bare string)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def sse_response(events: AsyncIterator[str], background: BackgroundTask) -> StreamingResponse:
    """An unbuffered ``text/event-stream`` response; ``background`` runs after it, sent or not."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=background)
