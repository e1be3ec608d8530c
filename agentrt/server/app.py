"""`create_app`: the FastAPI app, its ``lifespan`` (the model is built once and shared),
middleware, error handlers and routers; ``/health`` and ``/metrics`` live here."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from agentrt.llm import LLM
from agentrt.server import agent_api, openai_api, responses_api
from agentrt.server.errors import install_error_handlers
from agentrt.server.limits import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUE, AdmissionQueue,
                                   BodySizeLimit, check_api_key)
from agentrt.server.metrics import RequestMetrics
from agentrt.server.otel import TracingMiddleware
from agentrt.server.state import ServerState, server_state


# Liveness and metrics stay open when API keys are set (probes and scrapers send none).
_open_routes = APIRouter()


@_open_routes.get("/health")
async def health(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """Liveness, and whether the model is loaded."""
    return {"status": "ok" if state.llm is not None else "loading", "model": state.model_name}


@_open_routes.get("/metrics")
async def metrics(state: ServerState = Depends(server_state)) -> Response:
    """Prometheus metrics: TTFT and step histograms, tokens, cache hit rate, queue depth."""
    return Response(state.metrics.render(state.queue, state.llm), media_type=CONTENT_TYPE_LATEST)


def create_app(
    llm: LLM | None = None,
    registry: Any = None,
    *,
    api_keys: list[str] | str | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_name: str | None = None,
    model: str | None = None,
    retry_after_s: int = 1,
    public_docs: bool = False,
    engine_options: dict[str, Any] | None = None,
) -> FastAPI:
    """Build the server app.

    ``llm``: the model behind every route; None builds ``LocalLLM(model, **engine_options)`` in
    ``lifespan`` (``model`` None = the embedded SmolLM2; ``engine_options``: `EngineConfig` overrides).
    ``registry``: the tools ``/agent/run`` may run (None = the built-in tools that read no files, see
    `default_server_registry`). ``api_keys``: if given, every route but ``/health`` and ``/metrics``
    needs ``Authorization: Bearer <key>``, the OpenAPI docs (``/docs``, ``/redoc``, ``/openapi.json``)
    too unless ``public_docs``. At most ``max_concurrent`` requests run at once and ``max_queue`` wait;
    more get 429.
    """
    if isinstance(api_keys, str):
        api_keys = [api_keys]
    if registry is None:
        registry = default_server_registry()
    state = ServerState(llm, registry, api_keys=list(api_keys or []),
                        queue=AdmissionQueue(max_concurrent, max_queue, retry_after_s), model_name=model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = None
        if state.llm is None:
            from agentrt.llm import LocalLLM

            owned = await anyio.to_thread.run_sync(lambda: LocalLLM(model, **(engine_options or {})))
            logging.getLogger("uvicorn.error").info("agentrt: %s on %s", owned.model_name, owned.engine_summary)
            state.llm = owned
        try:
            yield
        finally:
            if owned is not None:
                owned.close()

    docs_open = public_docs or not state.api_keys
    app = FastAPI(title="agentrt", version="0.1.0", lifespan=lifespan,
                  description="Agent runs with grammar-constrained tool calls, and an OpenAI-compatible chat API.",
                  **({} if docs_open else {"docs_url": None, "redoc_url": None, "openapi_url": None}))
    if not docs_open:
        app.include_router(_docs_behind_the_key(app))
    app.state.agentrt = state
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(TracingMiddleware)  # a request span when tracing is on (agentrt.tracing)
    app.add_middleware(RequestMetrics, metrics=state.metrics)  # added last: outermost, counts the 413s too
    install_error_handlers(app)
    app.include_router(_open_routes)
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(agent_api.router)
    return app


def _docs_behind_the_key(app: FastAPI) -> APIRouter:
    """``/openapi.json``, ``/docs`` and ``/redoc`` answered only with a valid API key: the schema lists every
    route and tool, which a server that asks for keys does not show to anyone."""
    docs = APIRouter(dependencies=[Depends(check_api_key)], include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @docs.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="agentrt - docs")

    @docs.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="agentrt - ReDoc")

    return docs


def default_server_registry(files_root: str | None = None) -> Any:
    """The built-in tools a server offers by default: the pure ones (calculator, clock,
    units) only, unless ``files_root`` names the one folder the file and data tools may
    read, so that no client can read the server's files by default."""
    from agentrt.registry import ToolRegistry

    try:
        from agentrt.tools import builtin_registry
        from agentrt.tools.data import data_tools
        from agentrt.tools.files import FileSandbox, file_tools
    except ImportError:  # built-in tools not there: serve none
        return ToolRegistry()
    if files_root is not None:
        return builtin_registry(files_root)
    registry = builtin_registry()
    reads_files = {t.name for t in file_tools(None)} | {t.name for t in data_tools(FileSandbox(None))}
    return registry.subset([n for n in registry.names if n not in reads_files])
