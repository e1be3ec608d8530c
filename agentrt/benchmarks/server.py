"""`agentrt bench server`: a bounded load on the HTTP server over loopback, then scale-out.

Phase 1 starts ``agentrt serve`` (the embedded model unless ``--model``) in a child
process and drives it with ``--clients`` concurrent clients (16) through a fixed list
of jobs: ``--agent-runs`` ``POST /agent/run`` (built-in calculator) and ``--chats``
streamed ``/v1/chat/completions`` (tool calls and ``response_format`` json_schema, with
the official ``openai`` client). It prints requests/s, p50/p95 latency, client-side
TTFT p50/p95, errors (target 0) and the server's peak RSS (VmHWM).

Phase 2 shows the scale-out path end to end: a second agentrt process serves the model
and a front ``agentrt serve --remote-url`` (planner + tools, no model: its LLM is a
`RemoteLLM`) takes the same agent runs. Pointing ``--remote-url`` at vLLM or SGLang
instead is the whole of scaling out.

``--soak`` runs normal traffic beside hostile traffic instead and reports what the hostile part cost
(see `agentrt.benchmarks.soak`). Everything binds 127.0.0.1 and every child process is stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agentrt.benchmarks import soak
from agentrt.benchmarks.loopback import (CITIES, CITY_SCHEMA, WEATHER, metric_samples, pct, peak_rss_mb, rounded,
                                         serve_process)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--agent-runs", type=int, default=32, help="agent runs in phase 1 and 2 (default 32)")
    parser.add_argument("--chats", type=int, default=64, help="chat completions in phase 1 (default 64)")
    parser.add_argument("--model", default=None, metavar="PATH", help="model to serve (default: embedded)")
    parser.add_argument("--max-steps", type=int, default=3, help="max_steps of each agent run (default 3)")
    parser.add_argument("--no-remote", action="store_true", help="skip phase 2 (RemoteLLM scale-out)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 clients, 4 agent runs, 8 chats")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a server")
    soak.add_arguments(parser)


# ---------------------------------------------------------------------- the load


@dataclass
class Sample:
    """One request of the load. ``failure`` is "" (served), "http" (no usable HTTP answer:
    a status other than 200, a transport error, a broken stream), "run" (an agent run that
    failed: status error, or stopped by the server's run time limit: budget_exceeded / cancelled) or "output" (a 200 whose tool call or JSON does not parse/validate).
    ``outcome`` is the run's status or the chat's finish_reason."""

    kind: str
    failure: str
    latency_s: float
    ttft_s: list[float] = field(default_factory=list)
    error: str = ""
    steps: int = 0
    outcome: str = ""
    run_s: float = 0.0  # an agent run's own duration (server side)
    # per step of an agent run: (prompt, cached, completion tokens, TTFT s incl. queueing, decode s, tool s)
    trace: list[tuple[int, int, int, float, float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failure


def _agent_body(i: int, max_steps: int) -> dict[str, Any]:
    a, b = 12 + i, 7 + (i % 5)
    return {"task": f"What is {a} times {b}? Use the calculator.", "tools": ["calculate"],
            "tool_choice": "calculate", "max_steps": max_steps, "max_tokens": 96}


async def agent_job(http: Any, i: int, max_steps: int) -> Sample:
    start = time.perf_counter()
    try:
        r = await http.post("/agent/run", json=_agent_body(i, max_steps))
        latency = time.perf_counter() - start
        if r.status_code != 200:
            return Sample("agent", "http", latency, error=f"HTTP {r.status_code}: {r.text[:200]}")
        body = r.json()
        status, steps = body["status"], body["steps"]
        ttft = [s["ttft_s"] for s in steps]
        trace = [(s.get("prompt_tokens", 0), s.get("cached_tokens", 0), s.get("completion_tokens", 0),
                  s.get("ttft_s") or 0.0, s.get("decode_s") or 0.0, s.get("tool_time_s") or 0.0) for s in steps]
        run_s = body.get("duration_s") or 0.0
        if status in FAILED_RUN or not steps:
            last = steps[-1] if steps else {}
            why = f"finish_reason {last.get('finish_reason')}, step error {last.get('error')!r}" if last else "no step"
            return Sample("agent", "run", latency, ttft, f"run status {status}: {body.get('error')} ({why})",
                          len(steps), status, run_s, trace)
        return Sample("agent", "", latency, ttft, steps=len(steps), outcome=status, run_s=run_s, trace=trace)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures rather than stopping
        return Sample("agent", "http", time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


def check_chat_output(kwargs: dict[str, Any], finish: str | None, content: str, calls: dict[int, dict]) -> str:
    """Why a streamed chat's output is not what the request's grammar promises ("" if it is):
    reassembled tool-call arguments must parse and match the tool's schema, a json_schema
    answer must match its schema (a reply cut at max_tokens is exempt: it says so)."""
    import jsonschema

    if finish == "length":
        return ""
    try:
        if "tools" in kwargs:
            if finish != "tool_calls" or not calls:
                return f"tool_choice required but finish_reason {finish} with {len(calls)} call(s)"
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in kwargs["tools"]}
            for call in calls.values():
                jsonschema.validate(json.loads(call["args"]), schemas[call["name"]])
        else:
            jsonschema.validate(json.loads(content), kwargs["response_format"]["json_schema"]["schema"])
    except (ValueError, KeyError, jsonschema.ValidationError) as e:
        return f"invalid output: {type(e).__name__}: {str(e)[:160]}"
    return ""


async def chat_job(client: Any, i: int) -> Sample:
    city = CITIES[i % len(CITIES)]
    if i % 2 == 0:
        kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
                                  "tools": [WEATHER], "tool_choice": "required"}
    else:
        kwargs = {"messages": [{"role": "user", "content": f"Which country is {city} in? Answer in JSON."}],
                  "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "place", "schema": CITY_SCHEMA, "strict": True}}}
    start = time.perf_counter()
    first: float | None = None
    try:
        stream = await client.chat.completions.create(model="default", max_tokens=48, stream=True, **kwargs)
        finish, content, calls = None, "", {}
        async for chunk in stream:
            for choice in chunk.choices:
                d = choice.delta
                if first is None and d is not None and (d.content or d.tool_calls):
                    first = time.perf_counter() - start
                content += (d.content or "") if d is not None else ""
                for tc in (d.tool_calls or []) if d is not None else []:
                    slot = calls.setdefault(tc.index, {"name": "", "args": ""})
                    slot["name"] = (tc.function and tc.function.name) or slot["name"]
                    slot["args"] += (tc.function and tc.function.arguments) or ""
                finish = choice.finish_reason or finish
        latency = time.perf_counter() - start
        ttft = [first] if first is not None else []
        if finish not in ("stop", "tool_calls", "length"):
            return Sample("chat", "http", latency, ttft, f"stream ended with finish_reason {finish}", outcome=str(finish))
        invalid = check_chat_output(kwargs, finish, content, calls)
        return Sample("chat", "output" if invalid else "", latency, ttft, invalid, outcome=finish)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures rather than stopping
        return Sample("chat", "http", time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


async def run_load(url: str, clients: int, agent_runs: int, chats: int, max_steps: int) -> tuple[list[Sample], float]:
    """Interleave the jobs; ``clients`` workers take them in turn. Returns (samples, wall s)."""
    import httpx
    import openai

    jobs: list[tuple[str, int]] = []
    for i in range(max(agent_runs, chats)):
        if i < agent_runs:
            jobs.append(("agent", i))
        if i < chats:
            jobs.append(("chat", i))
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=900, max_retries=0,
                                    http_client=httpx.AsyncClient(timeout=900, limits=limits))

        async def worker() -> None:
            while not queue.empty():
                kind, i = queue.get_nowait()
                samples.append(await (agent_job(http, i, max_steps) if kind == "agent" else chat_job(client, i)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        await client.close()
    return samples, wall


FAILURES = {"http": "http_errors", "run": "agent_run_errors", "output": "invalid_outputs"}
FAILED_RUN = ("error", "budget_exceeded", "cancelled")  # max_steps is an outcome: the model did not answer in time


def _failures(group: list[Sample]) -> dict[str, int]:
    return {name: sum(s.failure == f for s in group) for f, name in FAILURES.items()}


def summarise(samples: list[Sample], wall_s: float, kinds: tuple[str, ...] = ("agent", "chat")) -> dict[str, Any]:
    """requests/s, errors by kind of failure, and per job kind: latency and TTFT
    percentiles of the served requests, and how they ended (run status / finish_reason)."""
    out: dict[str, Any] = {"requests": len(samples), "wall_s": round(wall_s, 2),
                           "requests_per_s": round(len(samples) / wall_s, 3) if wall_s else None,
                           "errors": sum(not s.ok for s in samples), **_failures(samples)}
    for kind in kinds:
        group = [s for s in samples if s.kind == kind]
        if not group:
            continue
        lat = [s.latency_s for s in group if s.ok]
        ttft = [t for s in group if s.ok for t in s.ttft_s]
        out[kind] = {
            "n": len(group), "errors": sum(not s.ok for s in group), **_failures(group),
            "outcomes": dict(sorted(Counter(s.outcome for s in group if s.outcome).items())),
            "latency_p50_s": rounded(pct(lat, 50)), "latency_p95_s": rounded(pct(lat, 95)),
            "ttft_p50_s": rounded(pct(ttft, 50)), "ttft_p95_s": rounded(pct(ttft, 95)),
        }
        if kind == "agent":
            out[kind]["mean_steps"] = rounded(statistics.fmean([s.steps for s in group if s.ok] or [0]))
            out[kind]["slowest_runs"] = slowest_runs(group)
    errors = [f"{s.kind}: {s.error}" for s in samples if not s.ok][:5]
    if errors:
        out["first_errors"] = errors
    return out


def slowest_runs(group: list[Sample], n: int = 3) -> list[dict[str, Any]]:
    """Where the slowest agent runs spent their time: per step, tokens (prompt/cached/completion),
    TTFT (queueing + prefill), decode and tool seconds; the rest of the run is the gaps between."""
    out = []
    for s in sorted(group, key=lambda s: s.run_s, reverse=True)[:n]:
        busy = sum(t[3] + t[4] + t[5] for t in s.trace)
        out.append({"run_s": rounded(s.run_s), "status": s.outcome, "other_s": rounded(s.run_s - busy),
                    "steps": [{"prompt": p, "cached": c, "completion": k, "ttft_s": rounded(ttft),
                               "decode_s": rounded(dec), "tool_s": rounded(tool)}
                              for p, c, k, ttft, dec, tool in s.trace]})
    return out


def _print_phase(title: str, res: dict[str, Any]) -> None:
    print(f"\n== {title}", flush=True)
    print(f"requests {res['requests']} in {res['wall_s']} s: {res['requests_per_s']} req/s, errors {res['errors']} "
          f"(HTTP/transport {res['http_errors']}, failed agent runs {res['agent_run_errors']}, "
          f"invalid outputs {res['invalid_outputs']})")
    for kind in ("agent", "chat"):
        if kind in res:
            r = res[kind]
            extra = f", mean steps {r['mean_steps']}" if "mean_steps" in r else ""
            print(f"  {kind:5s} n={r['n']:3d}  latency p50 {r['latency_p50_s']} s  p95 {r['latency_p95_s']} s  "
                  f"TTFT p50 {r['ttft_p50_s']} s  p95 {r['ttft_p95_s']} s{extra}")
            ends = ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())
            print(f"        {'run status' if kind == 'agent' else 'finish_reason'}: {ends or '-'}")
            for run in r.get("slowest_runs", []):
                steps = "; ".join(f"{st['prompt']}/{st['cached']}/{st['completion']} tok, ttft {st['ttft_s']} s, "
                                  f"decode {st['decode_s']} s" for st in run["steps"])
                print(f"        slow run {run['run_s']} s ({run['status']}, {run['other_s']} s outside steps): {steps}")
    for key in ("warmup_errors", "server_peak_rss_mb", "model_server_peak_rss_mb", "front_peak_rss_mb",
                "prefix_cache_hit_rate", "server_agent_runs"):
        if res.get(key) is not None:
            print(f"  {key}: {res[key]}")
    for err in res.get("first_errors", []):
        print(f"  error: {err}")
    sys.stdout.flush()


def main(args: argparse.Namespace) -> int:
    if args.soak:
        return soak.main(args)
    if args.quick:
        args.clients, args.agent_runs, args.chats = min(args.clients, 4), min(args.agent_runs, 4), min(args.chats, 8)
    if args.clients < 1 or args.agent_runs < 0 or args.chats < 0:
        print("agentrt bench server: --clients must be >= 1, counts >= 0", file=sys.stderr)
        return 2
    model_args = ["--model", args.model] if args.model else []
    # each server may take every client at once: the bench measures serving, not 429s
    limits = ["--max-concurrent", str(args.clients), "--max-queue", str(args.clients)]
    results: dict[str, Any] = {"clients": args.clients}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # A SIGTERM (e.g. from `timeout`) must still stop the child servers: unwind normally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    show = (lambda title, res: None) if args.json else _print_phase
    with serve_process(model_args + limits, args.startup_timeout) as (url, proc):
        # warm-up: every grammar compiled once (then cached), the first prefill done
        warm, _ = asyncio.run(run_load(url, 1, min(1, args.agent_runs), 2, args.max_steps))
        samples, wall = asyncio.run(run_load(url, args.clients, args.agent_runs, args.chats, args.max_steps))
        res = summarise(samples, wall)
        res["warmup_errors"] = sum(not s.ok for s in warm)  # not in the figures above, but not hidden
        res["server_peak_rss_mb"] = rounded(peak_rss_mb(proc.pid))
        res["prefix_cache_hit_rate"] = rounded(metric_samples(url, "agentrt_prefix_cache_hit_rate").get(""))
        # the server's own count (warm-up included): a cross-check of the clients' figures
        res["server_agent_runs"] = metric_samples(url, "agentrt_agent_runs_total")
        results["local"] = res
        show(f"local: agentrt serve, {args.clients} clients", res)

    if not args.no_remote and args.agent_runs:
        with serve_process(model_args + limits, args.startup_timeout) as (model_url, model_proc):
            front = ["--remote-url", model_url + "/v1", *limits]
            with serve_process(front, args.startup_timeout) as (front_url, front_proc):
                warm, _ = asyncio.run(run_load(front_url, 1, 1, 0, args.max_steps))
                samples, wall = asyncio.run(run_load(front_url, args.clients, args.agent_runs, 0, args.max_steps))
                res = summarise(samples, wall, ("agent",))
                res["warmup_errors"] = sum(not s.ok for s in warm)
                res["server_agent_runs"] = metric_samples(front_url, "agentrt_agent_runs_total")
                res["model_server_peak_rss_mb"] = rounded(peak_rss_mb(model_proc.pid))
                res["front_peak_rss_mb"] = rounded(peak_rss_mb(front_proc.pid))
                results["remote"] = res
                show("scale-out: agentrt serve --remote-url -> a second agentrt serve (RemoteLLM)", res)

    if args.json:
        print(json.dumps(results, indent=2))
    errors = results["local"]["errors"] + results.get("remote", {}).get("errors", 0)
    return 1 if errors else 0
