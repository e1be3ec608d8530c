"""Errors as OpenAI-style bodies: ``{"error": {"message", "type", "param", "code"}}``.

`APIError` is what routes raise; `install_error_handlers` makes every failure, the
framework's own (validation, 404, 405) and the engine's (unsupported schema keyword,
prompt over the context window), answer in that shape with a status saying whose fault it is.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("agentrt.server")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) answer was ready."""


def known_llm_error(exc: BaseException) -> APIError | None:
    """The `APIError` of an engine, grammar or upstream failure that the request caused
    (or that the upstream model server answered), None for anything else (a bug: 500)."""
    try:  # imported lazily: the engine pulls in torch, and a RemoteLLM server may have none (then none of these is raised)
        from agentrt.engine import ContextOverflowError
        from agentrt.engine.grammar.errors import (BudgetError, GrammarBusyError, GrammarCompileError,
                                                   UnsupportedSchemaError)
    except ImportError:
        return upstream_error(exc)
    # too many compiles at once: like a full admission queue, a 429 to retry, nothing wrong with the schema
    if isinstance(exc, GrammarBusyError):
        return APIError(429, str(exc), type="rate_limit_error", code="grammar_compiler_busy",
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, BudgetError):  # before its base, GrammarCompileError
        return APIError(400, f"{exc}. Raise max_tokens.", param="max_tokens", code="invalid_value")
    if isinstance(exc, UnsupportedSchemaError):
        return APIError(400, str(exc), param="schema", code="unsupported_schema")
    if isinstance(exc, GrammarCompileError):
        return APIError(400, f"the JSON Schema could not be compiled into a grammar: {exc}",
                        param="schema", code="invalid_schema")
    if isinstance(exc, ContextOverflowError):
        return APIError(400, f"{exc}. Shorten the messages or lower max_tokens.",
                        param="messages", code="context_length_exceeded")
    return upstream_error(exc)


def upstream_error(exc: BaseException) -> APIError | None:
    """Errors of a `RemoteLLM` backend (``serve --remote-url``): the upstream's verdict on
    the request passes through; its own failures are a 502."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        err = (exc.body or {}).get("error", exc.body) if isinstance(exc.body, dict) else None
        err = err if isinstance(err, dict) else {}
        text = f"the model server refused the request: {err.get('message') or exc}"
        if exc.status_code in (400, 404, 413, 422):
            return APIError(400, text, param=err.get("param"), code=err.get("code"))
        if exc.status_code == 429:
            return APIError(429, text, type="rate_limit_error", code="upstream_busy", headers={"Retry-After": "1"})
        return APIError(502, text, type="server_error", code="upstream_error")
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return APIError(502, f"the model server could not be reached: {exc}", type="server_error",
                        code="upstream_unreachable")
    return None


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the fields that failed pydantic validation (at most five of them)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail}); send a JSON object",
                        code="invalid_json")
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        path = ".".join(loc) or "body"
        param = param or path
        parts.append(f"{path}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return APIError(400, "invalid request: " + "; ".join(parts) + more, param=param, code="invalid_value")


def body_parse_error(cause: BaseException | None) -> APIError | None:
    """What was wrong with a body FastAPI could not parse (it says only "There was an error parsing the
    body" and keeps the reason as the exception's cause)."""
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"the request body is not UTF-8 text ({cause.encoding} cannot decode byte "
                        f"{cause.start}); send JSON encoded as UTF-8", code="invalid_encoding")
    if isinstance(cause, RecursionError):
        return APIError(400, "the request body nests JSON deeper than the parser's limit (about "
                        f"{sys.getrecursionlimit()} levels of arrays and objects); flatten it", code="too_deep")
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Every exception a route can raise -> an OpenAI-style error response."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unparsable = body_parse_error(exc.__cause__)
        if exc.status_code == 400 and unparsable is not None:
            return unparsable.response()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, code=kind,
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        err = known_llm_error(exc)
        if err is not None:
            return err.response()
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()
