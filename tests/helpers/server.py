"""Helpers of the server tests: a live uvicorn on loopback, SSE parsing, test LLMs."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn

from agentrt.llm import Completion
from agentrt.testing import ScriptedLLM
from agentrt.types import Usage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any, startup_timeout_s: float = 300.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread died during start-up")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("the server did not start in time")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def sse_events(lines: Iterator[str]) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) of each Server-Sent Event; ``[DONE]`` stays a string."""
    events, name, data = [], None, []
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        raw = "\n".join(data)
        events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


def prometheus_samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus exposition text."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def slow_llm(text: str = '{"answer":"' + "x" * 200 + '"}', delay_s: float = 0.05) -> ScriptedLLM:
    """Streams ``text`` 4 characters every ``delay_s``, for every call (``started``, ``finished``
    and ``closed_early`` count how streams ended)."""
    done = Completion(text=text, finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=50))
    return ScriptedLLM([], fallback=done, chunk_delay_s=delay_s, model_name="slow")


def raising_llm(exc: BaseException) -> ScriptedLLM:
    """Raises ``exc`` when a generation starts (as the engine/grammar do on bad input)."""
    return ScriptedLLM([], fallback=exc, model_name="raising")
