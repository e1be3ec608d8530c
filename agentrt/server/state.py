"""What every route shares (the LLM, the tools, the admission queue, the metrics) and the
``Depends`` provider that hands it to a route once the model is loaded."""
from __future__ import annotations

import time
from typing import Any

from fastapi import Request

from agentrt.llm import LLM
from agentrt.server.errors import APIError
from agentrt.server.limits import AdmissionQueue
from agentrt.server.metrics import ServerMetrics


class ServerState:
    """What every route shares: the LLM, the tools, the admission queue, the metrics."""

    def __init__(self, llm: LLM | None, registry: Any, *, api_keys: list[str], queue: AdmissionQueue,
                 model_name: str | None):
        self.llm = llm
        self.registry = registry
        self.api_keys = api_keys
        self.queue = queue
        self.metrics = ServerMetrics()
        self._model_name = model_name
        self.started = int(time.time())

    @property
    def model_name(self) -> str:
        return self._model_name or (self.llm.model_name if self.llm is not None else "") or "agentrt"


def server_state(request: Request) -> ServerState:
    """The app's `ServerState` (whether or not the model has loaded yet)."""
    return request.app.state.agentrt


def get_state(request: Request) -> ServerState:
    """The app's `ServerState` once its LLM is there; a 503 + Retry-After while it loads."""
    state = server_state(request)
    if state.llm is None:
        raise APIError(503, "the model is still loading; retry shortly", type="server_error",
                       code="model_loading", headers={"Retry-After": "2"})
    return state
