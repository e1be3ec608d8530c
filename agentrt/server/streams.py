"""Holding a generation while a client waits: its first chunk (so input errors are still a
4xx), its end, cancelling it when the client leaves, and Server-Sent Events framing."""
from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from agentrt.llm import Completion, CompletionChunk, final_completion
from agentrt.server.errors import APIError, ClientDisconnected, known_llm_error


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
