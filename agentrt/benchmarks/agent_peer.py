"""`agentrt bench agent --peer llamacpp`: the agent suite on agentrt vs llama.cpp, side by side.

The peer is llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, from the
``llama-cpp-python[server]`` extra, installed for the benchmark only) on 127.0.0.1, on the same GGUF
file with the same thread count. The same planner drives both: ours in process (`LocalLLM`, what
``agentrt run`` builds), the peer through `RemoteLLM`, so llama.cpp constrains each step's JSON with
its own grammar (``response_format`` ``json_object`` + ``schema``, detected at the first step).

Two phases, each side by side: the tasks one at a time (task by task, ours then the peer's), then
``--concurrency`` runs at once on each side in turn (the peer's server runs one request at a time and
queues the rest: ``--interrupt_requests False``, since by default a new request cuts the running one's
reply off). Per side: wall time, TTFT p50/p95 of steps >= 2, tokens generated and
forced (the peer's server reports no usage in its streams: 0), tool calls, the schema-invalid ones
(arguments the tool's schema refused) and all that errored, completed runs.
Targets: wall time ours / peer's at most 0.35x one at a time and 0.25x at once, step >= 2 TTFT p50
at most 0.3x, 0 invalid calls for ours (the peer's count is reported as it is).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from agentrt.benchmarks.agent_suite import TASKS, make_workspace, run_side_by_side, run_task, summarize
from agentrt.benchmarks.loopback import free_port, server_process
from agentrt.llm import LLM, GenerationParams

TARGETS = {"wall_time_ratio": 0.35, "wall_time_ratio_concurrent": 0.25, "ttft_ratio": 0.3}


@contextmanager
def llamacpp_server(gguf: str, threads: int, n_ctx: int, timeout_s: float = 180) -> Iterator[tuple[str, str]]:
    """Start llama-cpp-python's server on a free loopback port; yield (base URL, version); stop it."""
    import httpx
    import llama_cpp

    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
           # by default a new request interrupts the one running (its reply comes back empty): queue them
           "--interrupt_requests", "False"]
    url = f"http://127.0.0.1:{port}/v1"
    with server_process(cmd, lambda: httpx.get(url + "/models", timeout=2).status_code == 200,
                        "llama_cpp.server", timeout_s):
        yield url, f"llama-cpp-python {llama_cpp.__version__}"


def _side(results: list[Any], wall_s: float) -> dict[str, Any]:
    s = summarize(results, wall_s)
    steps = [st for r in results for st in r.steps]
    return {k: s[k] for k in ("runs", "completed", "steps", "ttft_step1_p50_ms", "ttft_step2plus_p50_ms",
                              "ttft_step2plus_p95_ms", "cached_share_step2plus", "tool_calls", "unusable_turns",
                              "total_s")} | {
        # arguments the tool's schema refused; tool_errors also counts tools that ran and raised
        "invalid_calls": sum(res.is_error and "invalid arguments for tool" in res.content
                             for r in results for st in r.steps for res in st.results),
        "tool_errors": s["tool_errors"],
        "tokens_generated": sum(st.completion_tokens for st in steps),
        "tokens_forced": sum(st.forced_tokens for st in steps),
        "statuses": {st: sum(r.status == st for r in results) for st in sorted({r.status for r in results})},
        "run_errors": [r.error for r in results if r.status != "completed"],
    }


async def _at_once(engines: dict[str, LLM], tasks: list[Any], tools: Any, params: GenerationParams,
                   concurrency: int) -> dict[str, dict[str, Any]]:
    import anyio

    out = {}
    for name, llm in engines.items():
        results: list[Any] = []
        limiter = anyio.CapacityLimiter(concurrency)

        async def one(task: Any, llm: LLM = llm, results: list[Any] = results, limiter: Any = limiter) -> None:
            async with limiter:
                results.append(await run_task(llm, task, tools, params))

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(one, task)
        out[name] = _side(results, time.perf_counter() - t0)
    return out


def run(args: argparse.Namespace, console: Any) -> int:
    import anyio

    from agentrt.engine.loader import embedded_model_path
    from agentrt.llm import LocalLLM
    from agentrt.remote import RemoteLLM
    from agentrt.tools import builtin_registry

    try:
        import llama_cpp.server  # noqa: F401 - the [server] extra: fastapi, sse-starlette, pydantic-settings...
    except ImportError as e:
        console.print(f"--peer llamacpp needs llama-cpp-python's server ({e}): "
                      "pip install 'llama-cpp-python[server]' (for the benchmark only, not an agentrt dependency)",
                      markup=False, soft_wrap=True)
        return 2
    gguf = args.model or str(embedded_model_path())
    if not gguf.endswith(".gguf") or not os.path.isfile(gguf):
        console.print(f"--peer llamacpp needs a GGUF file for both sides (--model), got {gguf!r}", markup=False)
        return 2
    tasks = list(TASKS[: 3 if args.quick else (args.tasks or len(TASKS))])
    tools = builtin_registry(make_workspace())
    params = GenerationParams(max_tokens=args.max_tokens)
    threads = args.threads
    ours = LocalLLM(gguf, num_threads=threads)
    report: dict[str, Any] = {"model": gguf, "threads": threads, "tasks": len(tasks),
                              "concurrency": args.concurrency, "ours_engine": ours.engine_summary}
    try:
        with llamacpp_server(gguf, threads, ours.context_window) as (url, version):
            peer = RemoteLLM(url, timeout=600)
            engines: dict[str, LLM] = {"agentrt": ours, "llama.cpp": peer}
            report["peer"] = version
            report["one_at_a_time"] = anyio.run(
                run_side_by_side, engines, tasks, tools, params,
                lambda name, task, result: console.print(f"[dim]{task.name:12s} {name:9s} {result.status}[/]",
                                                         highlight=False), _side)
            report["peer_constrained_by"] = peer.constrain_mode
            report["at_once"] = anyio.run(_at_once, engines, tasks, tools, params, args.concurrency)
    finally:
        ours.close()
    report["verdict"] = _verdict(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, console)
    return 0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _verdict(r: dict[str, Any]) -> dict[str, Any]:
    one, many = r["one_at_a_time"], r["at_once"]
    v = {"wall_time_ratio": _ratio(one["agentrt"]["total_s"], one["llama.cpp"]["total_s"]),
         "wall_time_ratio_concurrent": _ratio(many["agentrt"]["total_s"], many["llama.cpp"]["total_s"]),
         "ttft_ratio": _ratio(one["agentrt"]["ttft_step2plus_p50_ms"], one["llama.cpp"]["ttft_step2plus_p50_ms"]),
         "invalid_calls": {side: one[side]["invalid_calls"] + many[side]["invalid_calls"] for side in one}}
    for key, target in TARGETS.items():
        v[f"{key}_target_{target}"] = v[key] is not None and v[key] <= target
    v["ours_no_invalid_calls"] = v["invalid_calls"]["agentrt"] == 0
    return v


def _print(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    rows = [("runs completed", lambda s: f"{s['completed']}/{s['runs']}"),
            ("wall time s", lambda s: f"{s['total_s']:.1f}"),
            ("TTFT step 1 p50 ms", lambda s: f"{s['ttft_step1_p50_ms']:.0f}"),
            ("TTFT steps>=2 p50 ms", lambda s: f"{s['ttft_step2plus_p50_ms']:.0f}"),
            ("TTFT steps>=2 p95 ms", lambda s: f"{s['ttft_step2plus_p95_ms']:.0f}"),
            ("tokens generated (forced)", lambda s: f"{s['tokens_generated']} ({s['tokens_forced']})"),
            ("tool calls (schema-invalid / any error)",
             lambda s: f"{s['tool_calls']} ({s['invalid_calls']} / {s['tool_errors']})"),
            ("unusable turns", lambda s: str(s["unusable_turns"]))]
    for phase, title in (("one_at_a_time", "one at a time"), ("at_once", f"{r['concurrency']} runs at once")):
        table = Table(title=f"agent suite, {r['tasks']} tasks, {title}: agentrt vs {r['peer']} "
                            f"({r['threads']} threads, same GGUF)")
        table.add_column("")
        for side in r[phase]:
            table.add_column(side, justify="right")
        for label, fmt in rows:
            table.add_row(label, *(fmt(s) for s in r[phase].values()))
        console.print(table)
    v = r["verdict"]
    console.print(f"peer constrained by: {r['peer_constrained_by']}; ours: {r['ours_engine']}")
    for key, target in TARGETS.items():
        value = v[key]
        shown = "n/a" if value is None else f"{value:.2f}x"
        console.print(f"{key}: {shown} (target <= {target}x: {'met' if v[f'{key}_target_{target}'] else 'NOT met'})")
    console.print(f"invalid calls: {v['invalid_calls']}")
    for phase in ("one_at_a_time", "at_once"):
        for side, s in r[phase].items():
            for error in s["run_errors"]:
                console.print(f"{side}, {phase.replace('_', ' ')}: a run ended in error: {error}", markup=False)
