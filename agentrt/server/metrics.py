"""Prometheus metrics of one app: requests, latency, TTFT, agent steps, tokens, the prefix
cache hit rate, the admission queue and the engine's own statistics (``GET /metrics``)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agentrt.types import Usage

log = logging.getLogger("agentrt.server")


class ServerMetrics:
    """Prometheus metrics in a registry of this app's own (tests build several apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("agentrt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("agentrt_request_latency_seconds", "HTTP request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("agentrt_ttft_seconds", "time to first token of each generation", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.step = Histogram("agentrt_agent_step_seconds", "wall time of one agent step (model + tools)",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.steps_per_run = Histogram("agentrt_agent_steps", "steps per agent run", registry=r,
                                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.runs = Counter("agentrt_agent_runs", "finished agent runs by status", ["status"], registry=r)
        self.tokens = Counter("agentrt_tokens", "tokens by kind (prompt, completion, cached)", ["kind"], registry=r)
        self.cache_hit_rate = Gauge("agentrt_prefix_cache_hit_rate",
                                    "share of prompt tokens served from the prefix cache", registry=r)
        self.queue_depth = Gauge("agentrt_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("agentrt_running_requests", "requests being served", registry=r)
        self.engine = Gauge("agentrt_engine", "engine statistics (LLMEngine.stats())", ["stat"], registry=r)
        self._prompt = self._cached = 0

    def observe_usage(self, usage: Usage, ttft_s: float | None = None) -> None:
        """Count one generation's tokens (and its TTFT, when it produced a token)."""
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)
        self.tokens.labels("cached").inc(usage.cached_tokens)
        self._prompt += usage.prompt_tokens
        self._cached += usage.cached_tokens
        if self._prompt:
            self.cache_hit_rate.set(self._cached / self._prompt)
        if ttft_s:
            self.ttft.observe(ttft_s)

    def observe_step(self, step: Any) -> None:
        """One agent `Step`: its wall time, tokens and TTFT."""
        self.step.observe(step.duration_s or (step.ttft_s + step.decode_s + step.tool_time_s))
        self.observe_usage(Usage(prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens,
                                 cached_tokens=step.cached_tokens), step.ttft_s)

    def observe_run_end(self, result: Any) -> None:
        """A finished agent `RunResult` (its steps already observed): steps and status."""
        self.steps_per_run.observe(len(result.steps))
        self.runs.labels(str(result.status)).inc()

    def render(self, queue: Any, llm: Any) -> bytes:
        """The exposition text, with the queue gauges and engine statistics read now."""
        self.queue_depth.set(queue.waiting)
        self.running.set(queue.running)
        if llm is not None:
            try:
                stats = llm.stats()
                items = asdict(stats) if is_dataclass(stats) else {}
                for name, value in items.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.engine.labels(name).set(value)
            except Exception:  # metrics must never take the endpoint down
                log.exception("reading engine stats failed")
        return generate_latest(self.registry)


class ResponseStatus:
    """An ASGI ``send`` that remembers the response's status (500 if no response starts at all)."""

    def __init__(self, send: Any):
        self.send, self.code = send, 500

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.code = message["status"]
        await self.send(message)


class RequestMetrics:
    """Pure-ASGI middleware counting every HTTP request by route and status, with its
    latency (outermost, so refusals by the other middleware count too)."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = ResponseStatus(send)
        try:
            await self.app(scope, receive, status)
        finally:
            route = scope.get("route")  # set by the router on this same scope dict
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status.code)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
