"""`TracingMiddleware`: a SERVER span per HTTP request when tracing is on (see `agentrt.tracing`).

An incoming W3C ``traceparent`` (and ``baggage``) header is honoured, so a client's trace
continues here; the spans of the work the request does (the agent run, the model call) are
its children. With tracing off the middleware only passes the request on.
"""
from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from agentrt.server.metrics import ResponseStatus
from agentrt.tracing import get_tracer, tracing_enabled


def _carrier(scope: dict) -> dict[str, str]:
    """The request's headers as a dict for the propagators (a repeated header: the last one)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


class TracingMiddleware:
    """Pure-ASGI middleware: ``{method} {route}`` spans (e.g. ``POST /agent/run``) with the
    HTTP semantic-convention attributes, made current while the app handles the request."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not tracing_enabled():
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate  # loads the configured propagators: only when tracing

        method = scope.get("method", "GET")
        span = get_tracer().start_span(
            method, context=propagate.extract(_carrier(scope)), kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", ""),
                        "url.scheme": scope.get("scheme", "http")})
        status = ResponseStatus(send)
        error: BaseException | None = None
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, status)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            self._finish(span, scope, method, status.code, error)

    @staticmethod
    def _finish(span: Any, scope: dict, method: str, status: int, error: BaseException | None) -> None:
        route = getattr(scope.get("route"), "path", None)  # set by the router on this same scope dict
        if route:
            span.set_attribute("http.route", route)
            span.update_name(f"{method} {route}")
        span.set_attribute("http.response.status_code", status)
        if error is not None or status >= 500:
            span.set_attribute("error.type", type(error).__qualname__ if error is not None else str(status))
            span.set_status(StatusCode.ERROR, str(error) if error is not None else None)
        span.end()
