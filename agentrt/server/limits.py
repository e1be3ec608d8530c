"""What keeps the server standing: API keys, the body size limit, the admission queue.

`AdmissionQueue` lets ``max_concurrent`` requests at the LLM and ``max_queue`` wait; one
more is refused at once with 429 and ``Retry-After`` instead of piling up. `BodySizeLimit`
answers 413 to a body over the limit, declared or found while reading. `check_api_key`
is the ``Depends`` of every route but ``/health`` and ``/metrics``.
"""
from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Request

from agentrt.server.errors import APIError

DEFAULT_MAX_CONCURRENT = 32
DEFAULT_MAX_QUEUE = 128
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB


class QueueTicket:
    """A held slot of the admission queue; `release` is idempotent (streams release late)."""

    def __init__(self, queue: "AdmissionQueue"):
        self._queue: AdmissionQueue | None = queue

    def release(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            queue._release()


class AdmissionQueue:
    """At most ``max_concurrent`` requests at the LLM and ``max_queue`` waiting; beyond
    that a request is refused at once with 429 and ``Retry-After`` (never piled up)."""

    def __init__(self, max_concurrent: int, max_queue: int, retry_after_s: int = 1):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent, self.max_queue, self.retry_after_s = max_concurrent, max_queue, retry_after_s
        self.running = 0
        self.waiting = 0
        self._sem: asyncio.Semaphore | None = None  # made in the serving loop

    async def acquire(self) -> QueueTicket:
        """Wait for a slot, or raise a 429 `APIError` when the queue is full."""
        if self.running + self.waiting >= self.max_concurrent + self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({self.running} running, {self.waiting} queued); retry later",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after_s)},
            )
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrent)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return QueueTicket(self)

    def _release(self) -> None:
        self.running -= 1
        assert self._sem is not None
        self._sem.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """``async with queue.slot():`` holds a slot for the block."""
        ticket = await self.acquire()
        try:
            yield
        finally:
            ticket.release()


def check_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server was started with API keys."""
    keys: list[str] = request.app.state.agentrt.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in keys):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


class BodySizeLimit:
    """Pure-ASGI middleware: refuses bodies over ``max_body_bytes`` with 413, whether the
    size is declared (Content-Length) or only discovered while reading (chunked)."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await too_large.response()(scope, receive, send)
            else:  # the server's HTTP framing holds the client to the declared length
                await self.app(scope, receive, send)
            return
        # No declared length (chunked): read the body here, up to the limit, then replay it.
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > limit:
                await too_large.response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
