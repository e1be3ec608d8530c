"""`agentrt bench server --soak`: normal traffic beside hostile traffic, and what the hostile part cost it.

One ``agentrt serve`` (the embedded model unless ``--model``) on 127.0.0.1, with its own grammar cache
folder and cap. Then, all bounded in count and time, loopback only:

1. reference: each normal job alone on the idle server (greedy), its answer recorded;
2. clean load: ``--clients`` workers cycle the normal jobs (chats with tool calls, json_schema answers,
   plain text, streamed and not, and ``/agent/run`` with the calculator) for a third of ``--minutes``;
3. hostile load: the same, for ``--minutes``, beside ``--hostile-clients`` workers that cycle hostile
   requests: sampling parameters the engine cannot use and fuzzed ones, grammar compile bombs, bodies
   that do not parse (not UTF-8, 100k-deep JSON, truncated, 2 MB), a 1 MB prompt, mid-stream
   disconnects, bad ``/agent/run`` requests and bodies schemathesis generates from the server's
   own OpenAPI schema (when it is installed).

Reported, with the targets: 5xx answers (0); normal requests harmed while hostile traffic ran (0: a
failure, or an answer the same request never got without hostile traffic, on the idle server or
under the clean load). How many answers differ from the idle server's is shown too: on the torch path
(``--quantization none``, or a float model) batching alone can flip a greedy near-tie; in the fused
step (the default for a quantized GGUF) an answer does not depend on its batch, so both counts must be 0. Then p95 latency of the normal requests,
hostile vs clean (at most 1.5x); server RSS at 20%, 50% and 100% of the hostile phase (growth from
the first sample at most 5%); peak memory of the grammar compile processes (at most the compile
cap); grammar disk cache size (at most its cap); running requests and KV blocks after the load (0).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from agentrt.benchmarks.loopback import (CITIES, CITY_SCHEMA, WEATHER, memory_mb, metric_samples, pct, rounded,
                                         serve_process)

COMPILE_MEMORY_MB = 1024  # the soak server's cap on all grammar compiles together
BOMB_PATTERN = "^[ab]*a[ab]{22}$"  # a DFA of 2**23 states


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--soak", action="store_true", help="run the soak test instead of the load benchmark")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: minutes of hostile load (default 10)")
    parser.add_argument("--hostile-clients", type=int, default=4, help="soak: hostile workers (default 4)")
    parser.add_argument("--grammar-cache-mb", type=float, default=64.0,
                        help="soak: the server's grammar disk cache cap (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="soak: seed of the hostile mix (default 0)")
    parser.add_argument("--hostile-cases", default=None, metavar="PREFIXES",
                        help="soak: only the hostile cases whose names start with one of these comma-separated "
                        "prefixes (e.g. compile_bomb,schemathesis; default all)")
    parser.add_argument("--quantization", choices=["int8", "int4", "none"], default=None,
                        help="soak: serve with --quantization (default: the server's own choice, the fused step for "
                        "a quantized GGUF)")


# ---------------------------------------------------------------------- normal traffic


def normal_jobs() -> list[tuple[str, dict[str, Any]]]:
    """(kind, body) of the normal requests: greedy, so each has one right answer on an idle server."""
    jobs: list[tuple[str, dict[str, Any]]] = []
    for i, city in enumerate(CITIES[:4]):
        jobs.append(("chat", {"messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
                              "tools": [WEATHER], "tool_choice": "required", "max_tokens": 48, "stream": i % 2 == 0}))
        jobs.append(("chat", {"messages": [{"role": "user", "content": f"Which country is {city} in? Answer in JSON."}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "place", "schema": CITY_SCHEMA, "strict": True}},
                              "max_tokens": 48, "stream": i % 2 == 1}))
        jobs.append(("chat", {"messages": [{"role": "user", "content": f"Write one sentence about {city}."}],
                              "max_tokens": 32, "stream": True}))
        jobs.append(("agent", {"task": f"What is {12 + i} times {7 + i}? Use the calculator.", "tools": ["calculate"],
                               "tool_choice": "calculate", "max_steps": 3, "max_tokens": 96}))
    return jobs


def _sse_chat(lines: list[str]) -> tuple[str, list[list[str]], str | None, str]:
    """(content, [[name, arguments]...], finish_reason, error) of a streamed chat completion."""
    content, calls, finish, error, done = "", {}, None, "", False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"].get("message", "error event")
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], ["", ""])
                slot[0] = (tc.get("function") or {}).get("name") or slot[0]
                slot[1] += (tc.get("function") or {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    if not done and not error:
        error = "the stream ended without [DONE]"
    return content, [calls[i] for i in sorted(calls)], finish, error


async def run_normal(http: Any, kind: str, body: dict[str, Any]) -> tuple[str, Any, float]:
    """("" or why it failed, the answer to compare, latency s) of one normal request."""
    start = time.perf_counter()
    try:
        if kind == "agent":
            r = await http.post("/agent/run", json=body)
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:160]}", None, time.perf_counter() - start
            run = r.json()
            calls = [[[c["name"], c["arguments"]] for c in step["calls"]] for step in run["steps"]]
            return "", [run["status"], run["answer"], calls], time.perf_counter() - start
        if body.get("stream"):
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return f"HTTP {r.status_code}", None, time.perf_counter() - start
                lines = [line async for line in r.aiter_lines()]
            content, calls, finish, error = _sse_chat(lines)
            if error:
                return error, None, time.perf_counter() - start
            return "", [finish, content, calls], time.perf_counter() - start
        r = await http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:160]}", None, time.perf_counter() - start
        choice = r.json()["choices"][0]
        msg = choice["message"]
        calls = [[c["function"]["name"], c["function"]["arguments"]] for c in msg.get("tool_calls") or []]
        return "", [choice["finish_reason"], msg.get("content") or "", calls], time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a soak records failures rather than stopping
        return f"{type(e).__name__}: {e}", None, time.perf_counter() - start


@dataclass
class NormalResults:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    answers: list[tuple[int, Any]] = field(default_factory=list)  # (job, answer) of every served request
    count: int = 0

    def differing(self, allowed: dict[int, list[Any]]) -> list[str]:
        """The served requests whose answer is not among ``allowed[job]``."""
        return [f"job {job}: {json.dumps(a)[:200]}" for job, a in self.answers if a not in allowed.get(job, [])]


async def normal_load(url: str, clients: int, seconds: float) -> NormalResults:
    import httpx

    jobs = normal_jobs()
    out = NormalResults()
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < deadline:
                kind, body = jobs[i % len(jobs)]
                failure, answer, latency = await run_normal(http, kind, body)
                out.count += 1
                if failure:
                    out.failures.append(f"job {i % len(jobs)} ({kind}): {failure}")
                else:
                    out.latencies.append(latency)
                    out.answers.append((i % len(jobs), answer))
                i += clients

        await asyncio.gather(*(worker(w) for w in range(clients)))
    return out


# ---------------------------------------------------------------------- hostile traffic

Hostile = Callable[[Any, random.Random], Awaitable[int]]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


async def _post_raw(http: Any, path: str, content: bytes | str) -> int:
    return (await http.post(path, content=content, headers={"content-type": "application/json"})).status_code


async def _chat(http: Any, **body: Any) -> int:
    return (await http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 16, **body})).status_code


def _doubling_defs(levels: int) -> dict[str, Any]:
    defs = {"d0": {"type": "string", "maxLength": 3}}
    for i in range(1, levels):
        defs[f"d{i}"] = {"type": "array", "items": [{"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}
    return {"$defs": defs, "$ref": f"#/$defs/d{levels - 1}"}


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


FUZZ_VALUES: list[Any] = [-1, 0, 1e-45, 1e-300, 1e308, 2**64, -(2**63) - 1, "x", None, [], {}, True, ""]


async def fuzzed_sampling(http: Any, rng: random.Random) -> int:
    body: dict[str, Any] = {"messages": ASK, "max_tokens": 8}
    for key in rng.sample(["temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "n", "logprobs"], 3):
        body[key] = rng.choice(FUZZ_VALUES)
    return (await http.post("/v1/chat/completions", json=body)).status_code


async def disconnect_mid_stream(http: Any, rng: random.Random) -> int:
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # hang up after the first text
        return r.status_code


HOSTILE: dict[str, Hostile] = {
    "temperature_1e-40": lambda h, r: _chat(h, temperature=1e-40, seed=r.randrange(2**32)),
    "temperature_1e-300": lambda h, r: _chat(h, temperature=1e-300),
    "temperature_nan": lambda h, r: _post_raw(h, "/v1/chat/completions",
                                              json.dumps({"messages": ASK, "temperature": float("nan")})),
    "seed_2**64": lambda h, r: _chat(h, seed=2**64, temperature=0.7),
    "seed_below_-2**63": lambda h, r: _chat(h, seed=-(2**63) - 1, temperature=0.7),
    "empty_stop": lambda h, r: _chat(h, stop=[""]),
    "fuzzed_sampling": fuzzed_sampling,
    "compile_bomb_pattern": lambda h, r: _chat(h, response_format=_schema_format(
        {"type": "string", "pattern": BOMB_PATTERN})),
    "compile_bomb_defs": lambda h, r: _chat(h, response_format=_schema_format(_doubling_defs(15))),
    "fresh_schema": lambda h, r: _chat(h, response_format=_schema_format(  # fills the grammar disk cache
        {"type": "object", "properties": {f"k{r.randrange(10**9)}": {"type": "integer"}}, "required": []})),
    "schema_nested_200": lambda h, r: _chat(h, response_format=_schema_format(
        json.loads('{"anyOf": [' * 200 + '{"type": "string"}' + "]}" * 200))),
    "body_not_utf8": lambda h, r: _post_raw(h, "/v1/chat/completions", b'{"messages": "\xff\xfe\xfa"}'),
    "body_100k_deep": lambda h, r: _post_raw(h, "/v1/chat/completions", "[" * 100_000 + "]" * 100_000),
    "body_truncated": lambda h, r: _post_raw(h, "/v1/chat/completions", '{"messages": [{"role": "us'),
    "body_2mb": lambda h, r: _post_raw(h, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x" * (2 << 20)}]})),
    "prompt_1mb": lambda h, r: _chat(h, messages=[{"role": "user", "content": "word " * 208_000}]),
    "disconnect_mid_stream": disconnect_mid_stream,
    "agent_required_no_tools": lambda h, r: _status(h.post("/agent/run", json={
        "task": "x", "tools": [], "tool_choice": "required"})),
    "agent_unknown_tool": lambda h, r: _status(h.post("/agent/run", json={"task": "x", "tools": ["shell"]})),
    "agent_temperature_nan": lambda h, r: _post_raw(h, "/agent/run", '{"task": "x", "temperature": NaN}'),
}


async def _status(response: Awaitable[Any]) -> int:
    return (await response).status_code


def schemathesis_bodies(url: str, n: int, seed: int) -> list[tuple[str, Any]]:
    """(path, body) of ``n`` requests per POST operation, generated from the server's OpenAPI schema;
    [] with a note when schemathesis is not installed."""
    try:
        import schemathesis
        from hypothesis import errors as hypothesis_errors
    except ImportError:
        print("soak: schemathesis is not installed (pip install agentrt[dev]): no generated bodies", file=sys.stderr)
        return []
    random.seed(seed)
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    out: list[tuple[str, Any]] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.lower() != "post":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hypothesis_errors.NonInteractiveExampleWarning)
            strategy = op.as_strategy()
            out += [(op.path, strategy.example().body) for _ in range(n)]
    return out


def hostile_cases(generated: list[tuple[str, Any]], prefixes: str | None) -> list[tuple[str, Hostile]]:
    """The named hostile cases, the generated bodies among them, kept to those whose names start with
    one of the comma-separated ``prefixes`` (all when None)."""
    cases = list(HOSTILE.items())
    for path, body in generated:
        cases.append((f"schemathesis{path}", lambda h, r, path=path, body=body: _status(h.post(path, json=body))))
    if prefixes is None:
        return cases
    wanted = tuple(p.strip() for p in prefixes.split(",") if p.strip())
    return [(name, case) for name, case in cases if name.startswith(wanted)]


async def hostile_load(url: str, clients: int, seconds: float, seed: int, cases: list[tuple[str, Hostile]]
                       ) -> tuple[Counter, list[str]]:
    """(counts of "case status", 5xx descriptions) of ``clients`` hostile workers cycling ``cases`` for
    ``seconds``."""
    import httpx

    counts: Counter = Counter()
    server_errors: list[str] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async def worker(w: int) -> None:
            rng = random.Random(seed * 1000 + w)
            i = w
            while time.monotonic() < deadline:
                name, case = cases[i % len(cases)] if i < len(cases) else rng.choice(cases)
                try:
                    status = await case(http, rng)
                except httpx.TimeoutException:
                    status = 0  # our own client gave up: a slow request, not an answer
                except httpx.HTTPError as e:
                    status = -1
                    server_errors.append(f"{name}: transport error {type(e).__name__}: {e}")
                counts[f"{name} {status}"] += 1
                if status >= 500:
                    server_errors.append(f"{name}: HTTP {status}")
                i += clients

        await asyncio.gather(*(worker(w) for w in range(clients)))
    return counts, server_errors


# ---------------------------------------------------------------------- the server's resources


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def private_mb(pid: int) -> float:
    """Memory only this process holds (a forked compile's own allocations, not the pages it shares)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        return 0.0
    return total / 1024


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / (1 << 20)


class ResourceWatch:
    """Polls the server's compile processes (their private memory, summed) and the grammar cache
    folder from a thread; takes RSS samples when asked."""

    def __init__(self, pid: int, cache_dir: Path):
        self.pid, self.cache_dir = pid, cache_dir
        self.compile_peak_mb = 0.0
        self.cache_peak_mb = 0.0
        self.rss: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ResourceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        last_dir = 0.0
        while not self._stop.wait(0.2):
            # each compile is a process forked by one of the server's compile workers
            compiles = [job for worker in children(self.pid) for job in children(worker)]
            self.compile_peak_mb = max(self.compile_peak_mb, sum(private_mb(g) for g in compiles))
            if time.monotonic() - last_dir > 2:
                last_dir = time.monotonic()
                self.cache_peak_mb = max(self.cache_peak_mb, dir_mb(self.cache_dir))


async def sample_rss(watch: ResourceWatch, seconds: float) -> None:
    start = time.monotonic()
    for share in (0.2, 0.5, 1.0):
        await asyncio.sleep(max(0.0, start + share * seconds - time.monotonic() - (1 if share == 1.0 else 0)))
        watch.rss.append((round(time.monotonic() - start), rounded(memory_mb(watch.pid))))


def wait_idle(url: str, timeout_s: float = 120) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        engine = metric_samples(url, "agentrt_engine")
        running = metric_samples(url, "agentrt_running_requests").get("", 0)
        state = {"running_requests": running, "kv_blocks_used": engine.get("kv_blocks_used", -1),
                 "engine_running": engine.get("running", 0), "engine_waiting": engine.get("waiting", 0)}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


# ---------------------------------------------------------------------- the report


def main(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.clients < 1 or args.hostile_clients < 0:
        print("agentrt bench server --soak: --minutes > 0, --clients >= 1, --hostile-clients >= 0", file=sys.stderr)
        return 2
    if args.hostile_cases is not None and not hostile_cases([("/x", None)], args.hostile_cases):
        print(f"agentrt bench server --soak: no hostile case starts with {args.hostile_cases!r}; the cases: "
              f"{', '.join(HOSTILE)}, schemathesis", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the child server
    cache = Path(tempfile.mkdtemp(prefix="agentrt-soak-"))
    os.environ.update({"AGENTRT_CACHE_DIR": str(cache), "AGENTRT_GRAMMAR_CACHE_MB": str(args.grammar_cache_mb),
                       "AGENTRT_GRAMMAR_COMPILE_MEMORY_MB": str(COMPILE_MEMORY_MB), "TOKENIZERS_PARALLELISM": "false"})
    seconds = args.minutes * 60
    extra = (["--model", args.model] if args.model else []) + (
        ["--quantization", args.quantization] if args.quantization else []) + [
        "--max-concurrent", str(args.clients + args.hostile_clients), "--max-queue", "64"]
    report: dict[str, Any] = {"minutes": args.minutes, "clients": args.clients,
                              "hostile_clients": args.hostile_clients, "hostile_cases": args.hostile_cases or "all",
                              "quantization": args.quantization}
    with serve_process(extra, args.startup_timeout) as (url, proc):
        reference = asyncio.run(_reference(url))
        report["reference_failures"] = [f"job {i}: {why}" for i, why in reference.items() if isinstance(why, str)]
        idle = {i: [a] for i, a in reference.items() if not isinstance(a, str)}
        clean = asyncio.run(normal_load(url, args.clients, seconds / 3))
        cases = hostile_cases(schemathesis_bodies(url, 20, args.seed), args.hostile_cases)
        with ResourceWatch(proc.pid, cache / "grammar") as watch:
            async def hostile_phase() -> list[Any]:
                return await asyncio.gather(normal_load(url, args.clients, seconds),
                                            hostile_load(url, args.hostile_clients, seconds, args.seed, cases),
                                            sample_rss(watch, seconds))
            normal, (counts, server_errors), _ = asyncio.run(hostile_phase())
        report |= _summary(idle, clean, normal, counts, server_errors, watch, args)
        report["after"] = wait_idle(url)
    report["targets"] = _targets(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if all(report["targets"].values()) else 1


async def _reference(url: str) -> dict[int, Any]:
    """Each normal job's answer on the idle server (or why it failed)."""
    import httpx

    out: dict[int, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for i, (kind, body) in enumerate(normal_jobs()):
            failure, answer, _ = await run_normal(http, kind, body)
            out[i] = failure or answer
    return out


def _summary(idle: dict[int, list[Any]], clean: NormalResults, normal: NormalResults, counts: Counter,
             server_errors: list[str], watch: ResourceWatch, args: argparse.Namespace) -> dict[str, Any]:
    p95_clean, p95_hostile = pct(clean.latencies, 95), pct(normal.latencies, 95)
    # what the same requests answered without hostile traffic: on the idle server, or under the clean load
    # (batching alone changes a greedy answer where the engine's numbers depend on the batch)
    seen = {job: answers + [a for j, a in clean.answers if j == job] for job, answers in idle.items()}
    differs, unseen = normal.differing(idle), normal.differing(seen)
    first_rss = watch.rss[0][1] if watch.rss else None
    last_rss = watch.rss[-1][1] if watch.rss else None
    by_status = Counter()
    for key, n in counts.items():
        by_status[key.rsplit(" ", 1)[1]] += n
    return {
        "server_5xx": len(server_errors), "first_5xx": server_errors[:5],
        "hostile_requests": sum(counts.values()), "hostile_by_status": dict(sorted(by_status.items())),
        "hostile_by_case": dict(sorted(counts.items())),
        "normal_requests": normal.count, "normal_failed": len(normal.failures),
        "normal_differs_from_idle": len(differs), "normal_unseen_without_hostile": len(unseen),
        "normal_harmed": len(normal.failures) + len(unseen),
        "first_harmed": (normal.failures + unseen)[:5],
        "clean_requests": clean.count, "clean_failed": len(clean.failures),
        "clean_differs_from_idle": len(clean.differing(idle)),
        "normal_p95_s": {"clean": rounded(p95_clean), "hostile": rounded(p95_hostile)},
        "normal_p50_s": {"clean": rounded(pct(clean.latencies, 50)), "hostile": rounded(pct(normal.latencies, 50))},
        "p95_ratio": rounded(p95_hostile / p95_clean) if p95_clean and p95_hostile else None,
        "rss_mb_at_s": watch.rss,
        "rss_growth": rounded(last_rss / first_rss - 1) if first_rss and last_rss else None,
        "compile_memory_peak_mb": round(watch.compile_peak_mb, 1), "compile_memory_cap_mb": COMPILE_MEMORY_MB,
        "grammar_cache_peak_mb": round(watch.cache_peak_mb, 1), "grammar_cache_cap_mb": args.grammar_cache_mb,
        "mean_normal_latency_s": rounded(statistics.fmean(normal.latencies)) if normal.latencies else None,
    }


def _targets(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "no 5xx": r["server_5xx"] == 0,
        "no normal request harmed (failed, or an answer never given without hostile traffic)":
            r["normal_harmed"] == 0 and not r["reference_failures"],
        "p95 at most 1.5x the clean load's": r["p95_ratio"] is not None and r["p95_ratio"] <= 1.5,
        "RSS growth at most 5%": r["rss_growth"] is not None and r["rss_growth"] <= 0.05,
        "compile memory within its cap": r["compile_memory_peak_mb"] <= r["compile_memory_cap_mb"],
        "grammar cache within its cap": r["grammar_cache_peak_mb"] <= r["grammar_cache_cap_mb"],
        "idle afterwards": not any(r["after"].values()),
    }


def _print(r: dict[str, Any]) -> None:
    engine = f"--quantization {r['quantization']}" if r["quantization"] else "the default engine"
    print(f"soak: {r['minutes']} min of hostile load, {r['clients']} normal + {r['hostile_clients']} hostile clients, "
          f"{engine}")
    print(f"  hostile requests {r['hostile_requests']}: by status {r['hostile_by_status']}; 5xx {r['server_5xx']}")
    for e in r["first_5xx"]:
        print(f"    5xx: {e}")
    print(f"  normal requests {r['normal_requests']}: failed {r['normal_failed']}, answer other than the idle "
          f"server's {r['normal_differs_from_idle']}, answer never given without hostile traffic "
          f"{r['normal_unseen_without_hostile']} (clean load: {r['clean_requests']} requests, failed "
          f"{r['clean_failed']}, other than the idle server's {r['clean_differs_from_idle']})")
    for e in r["first_harmed"]:
        print(f"    harmed: {e}")
    for e in r["reference_failures"]:
        print(f"    reference failed: {e}")
    print(f"  normal latency p50 {r['normal_p50_s']}, p95 {r['normal_p95_s']}: ratio {r['p95_ratio']}")
    print(f"  server RSS MB at s {r['rss_mb_at_s']}: growth {r['rss_growth']}")
    print(f"  compile memory peak {r['compile_memory_peak_mb']} MB (cap {r['compile_memory_cap_mb']}), grammar cache "
          f"peak {r['grammar_cache_peak_mb']} MB (cap {r['grammar_cache_cap_mb']})")
    print(f"  after the load: {r['after']}")
    for name, ok in r["targets"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
