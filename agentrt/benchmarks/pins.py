"""`agentrt bench agent --pins`: KV pinned through tool calls vs not, on a crowded KV pool, side by side.

``--concurrency`` agent runs at once (the bench's task suite, cycled) on a KV pool sized for
``--kv-runs`` of them (each run's largest step, measured by a first run on a roomy pool), with
tools that take ``--tool-delay-ms`` (a run waits on a slow tool while the others prefill and
decode), while ``--churn-clients`` send one-off chat requests (distinct ~300-token prompts) until
the runs end: the other traffic of a shared server, whose cached blocks compete with the runs'
prefixes. Two engines, the same in all but ``kv_pin_ttl_s`` (30 s vs 0), run the same load in
turn. Reported per engine: the share of prompt tokens at steps >= 2 served from the prefix cache
(target >= 90% with pins), runs completed, errors, wall time, one-off requests served, and how
often a pin was given up to make room.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import anyio

from agentrt.benchmarks.agent_suite import TASKS, make_workspace, run_task, summarize
from agentrt.llm import GenerationParams
from agentrt.registry import ToolRegistry
from agentrt.types import ToolCall, ToolResult

PIN_TTL_S = 30.0


class SlowTools(ToolRegistry):
    """The built-in tools, each call ``delay_s`` slower (a remote API)."""

    def __init__(self, tools: ToolRegistry, delay_s: float):
        super().__init__(list(tools))
        self.delay_s = delay_s

    async def call(self, call: ToolCall, **kwargs: Any) -> ToolResult:
        await anyio.sleep(self.delay_s)
        return await super().call(call, **kwargs)


def largest_step_tokens(args: Any, tools: ToolRegistry, params: GenerationParams) -> int:
    """The most KV tokens one run's step holds (prompt + output), over the suite, on a roomy pool."""
    from agentrt.llm import LocalLLM

    async def measure(llm: Any) -> int:
        results = [await run_task(llm, task, tools, params) for task in TASKS]
        return max(s.prompt_tokens + s.completion_tokens for r in results for s in r.steps)

    with LocalLLM(args.model) as llm:
        return anyio.run(measure, llm)


async def crowd(llm: Any, concurrency: int, churn_clients: int, tools: ToolRegistry,
                params: GenerationParams) -> tuple[list, float, int]:
    """The runs at once, and one-off requests beside them until the runs end: (results, wall, one-offs)."""
    results: list = []
    one_offs = 0
    runs_done = anyio.Event()

    async def one(i: int) -> None:
        results.append(await run_task(llm, TASKS[i % len(TASKS)], tools, params))

    async def runs() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(one, i)
        runs_done.set()

    async def churn(client: int) -> None:
        nonlocal one_offs
        n = 0
        while not runs_done.is_set():
            words = " ".join(f"item{client}-{n}-{k}" for k in range(60))  # ~300 tokens, shared by no one
            await llm.complete([{"role": "user", "content": f"Summarize: {words}"}],
                               params=GenerationParams(max_tokens=16))
            n += 1
            one_offs += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(runs)
        for c in range(churn_clients):
            tg.start_soon(churn, c)
    return results, time.perf_counter() - started, one_offs


def run(args: Any, console: Any) -> int:
    from agentrt.llm import LocalLLM
    from agentrt.tools import builtin_registry

    params = GenerationParams(max_tokens=args.max_tokens)
    tools = SlowTools(builtin_registry(make_workspace()), args.tool_delay_ms / 1000)
    with console.status("measuring one run's largest step on a roomy pool..."):
        per_run = largest_step_tokens(args, builtin_registry(make_workspace()), params)
    block_size = 16
    num_blocks = args.kv_runs * math.ceil(per_run / block_size)
    out: dict[str, Any] = {"concurrency": args.concurrency, "kv_runs": args.kv_runs, "largest_step_tokens": per_run,
                           "num_kv_blocks": num_blocks, "tool_delay_ms": args.tool_delay_ms, "engines": {}}
    for name, ttl in (("pins on", PIN_TTL_S), ("pins off", 0.0)):
        with console.status(f"{name}: {args.concurrency} runs at once on {num_blocks} blocks..."):
            with LocalLLM(args.model, num_kv_blocks=num_blocks, block_size=block_size, kv_pin_ttl_s=ttl,
                          max_num_seqs=args.concurrency) as llm:
                results, wall, one_offs = anyio.run(crowd, llm, args.concurrency, args.churn_clients, tools, params)
                released = llm.sync_engine.block_manager.pins_released_early
        summary = summarize(results, wall)
        summary["pins_released_to_make_room"] = released
        summary["errors"] = sum(r.status == "error" for r in results)
        summary["one_off_requests"] = one_offs
        out["engines"][name] = summary
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console.print(f"{args.concurrency} runs at once, KV pool for {args.kv_runs} ({num_blocks} blocks of {block_size}; "
                  f"a run's largest step {per_run} tokens), tools +{args.tool_delay_ms} ms, "
                  f"{args.churn_clients} clients of one-off requests beside them", highlight=False)
    for name, s in out["engines"].items():
        console.print(f"{name:8s}: cached share steps>=2 {s['cached_share_step2plus']:.1%}, completed "
                      f"{s['completed']}/{s['runs']} (errors {s['errors']}), steps>=2 TTFT p50 "
                      f"{s['ttft_step2plus_p50_ms']:.0f} ms, wall {s['total_s']:.1f} s, one-off requests "
                      f"{s['one_off_requests']}, pins given up for room {s['pins_released_to_make_room']}",
                      highlight=False)
    return 0
