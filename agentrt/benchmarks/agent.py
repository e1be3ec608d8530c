"""`agentrt bench agent`: multi-step agent runs with the prefix cache on vs off, side by side.

A fixed suite of tasks, each a question answered in 4 steps: three tool calls then the
final answer, on the built-in tools. Each task's tool for each step is fixed by a
tool_choice schedule (the model picks the arguments; the grammar forces the rest), so
both engines do the same number of steps on the same prompts and the comparison is of
the engine alone. Tasks run in turn on two engines in this one process (cache on, then
cache off, task by task, so machine noise hits both alike).

Reported per engine: TTFT p50/p95 of steps >= 2 (step 1 separately), the share of
prompt tokens at steps >= 2 served from the prefix cache, tool-call errors, total time.
Targets: cached share at steps >= 2 >= 90%; steps >= 2 TTFT >= 5x lower with the cache.

Append-only prompting is checked step by step: the criterion is that every step n >= 2 is
served at least all of step n-1's tokens from the cache (cached_tokens[n] >= prompt_tokens[n-1]
+ completion_tokens[n-1]); the bench prints how many steps meet it, and how many of the
previous step's tokens the others missed. Also reported: how many tokens each step adds (the
tool results and the chat template's turn markers), which no cache can serve.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agentrt.llm import LLM, GenerationParams
from agentrt.types import RunResult


@dataclass(frozen=True)
class AgentTask:
    """A question and the tool each step must call (then one answer step)."""

    name: str
    question: str
    plan: tuple[str, ...]

    def tool_choice(self, step: int) -> str:
        return self.plan[step - 1] if step <= len(self.plan) else "answer"


TASKS: tuple[AgentTask, ...] = (
    AgentTask("arith-chain", "Compute 12*7, then add 15 to that result, then convert that many km to miles.",
              ("calculate", "calculate", "convert_units")),
    AgentTask("dates-tokyo", "What time is it in Asia/Tokyo? Which weekday is 2025-12-25? How many days from 2025-01-01 to 2025-12-25?",
              ("current_time", "weekday", "date_difference")),
    AgentTask("units-mix", "Convert 100 F to C, then 5 kg to lb, then compute 3.5*4.",
              ("convert_units", "convert_units", "calculate")),
    AgentTask("files-notes", "List the files in the folder, read notes.txt, then compute 2**10.",
              ("list_files", "read_file", "calculate")),
    AgentTask("sales-sum", "In sales.csv, sum the amount column, then count the rows where region is north, then compute 1200/8.",
              ("query_data", "query_data", "calculate")),
    AgentTask("leap-month", "Add 30 days to 2024-02-01, tell the weekday of 2024-03-02, then compute 30*24.",
              ("add_to_date", "weekday", "calculate")),
    AgentTask("tz-hop", "Convert 2024-06-01T12:00:00 from UTC to America/New_York, get the time in Europe/Paris, then compute 9*9.",
              ("convert_time", "current_time", "calculate")),
    AgentTask("marathon", "Convert 42.195 km to miles, convert 3 hours to minutes, then compute 180/26.2.",
              ("convert_units", "convert_units", "calculate")),
    AgentTask("deadline", "Add 2 weeks to 2025-03-10, find the weekday of 2025-03-24, then count days from 2025-03-10 to 2025-03-24.",
              ("add_to_date", "weekday", "date_difference")),
    AgentTask("budget-csv", "Read sales.csv, find the max amount in it, then compute 250*1.2.",
              ("read_file", "query_data", "calculate")),
    AgentTask("cooking", "Convert 350 F to C, convert 2 cups to ml, then compute 2*250.",
              ("convert_units", "convert_units", "calculate")),
    AgentTask("compound", "Compute 1000*1.05**3, round it with the calculator, then convert that many grams to kg.",
              ("calculate", "calculate", "convert_units")),
    AgentTask("meeting", "What time is it in UTC? Convert 2025-05-05T09:00:00 from Europe/London to Asia/Kolkata. What weekday is 2025-05-05?",
              ("current_time", "convert_time", "weekday")),
    AgentTask("inventory", "List the csv files, then average the amount column of sales.csv, then compute 17+25.",
              ("list_files", "query_data", "calculate")),
    AgentTask("age", "How many days from 1990-07-15 to 2025-07-15? Compute that number divided by 365. Which weekday was 1990-07-15?",
              ("date_difference", "calculate", "weekday")),
    AgentTask("storage", "Convert 500 GB to MiB, then compute 1024*3, then convert 3072 MB to GB.",
              ("convert_units", "calculate", "convert_units")),
    AgentTask("speed", "Convert 60 mph to km/h, compute 100/1.609, then convert 10 km to mi.",
              ("convert_units", "calculate", "convert_units")),
    AgentTask("readme", "Read notes.txt, list the files, then compute 7*6.",
              ("read_file", "list_files", "calculate")),
    AgentTask("quarter", "Add 3 months to 2025-01-31, count the days from 2025-01-31 to 2025-04-30, then compute that count times 24.",
              ("add_to_date", "date_difference", "calculate")),
    AgentTask("north-south", "Count the sales.csv rows where region is south, sum their amount, then compute the difference 900-350.",
              ("query_data", "query_data", "calculate")),
    AgentTask("weights", "Convert 70 kg to lb, convert 154 lb to kg, then compute 70*2.2046.",
              ("convert_units", "convert_units", "calculate")),
    AgentTask("new-year", "What weekday is 2026-01-01? Add 100 days to 2026-01-01. Get the current time in Australia/Sydney.",
              ("weekday", "add_to_date", "current_time")),
)

FILES = {
    "notes.txt": "Shopping: 3 apples, 2 pears.\nMeeting with Ada on Friday at 10:00.\nBudget: 1200 EUR for 8 people.\n",
    "sales.csv": "region,product,amount\nnorth,apples,120\nsouth,pears,200\nnorth,plums,80\neast,apples,300\nsouth,figs,150\n",
}


def make_workspace() -> Path:
    """A temporary folder with the files the tasks read."""
    root = Path(tempfile.mkdtemp(prefix="agentrt-bench-"))
    for name, text in FILES.items():
        (root / name).write_text(text)
    return root


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def summarize(results: list[RunResult], wall_s: float) -> dict[str, Any]:
    """Per-engine figures over all runs: TTFT of steps >= 2 and step 1, cached share, errors."""
    later = [s for r in results for s in r.steps if s.index >= 2]
    first = [s for r in results for s in r.steps if s.index == 1]
    later_ttft = [s.ttft_s for s in later]
    prompt_later = sum(s.prompt_tokens for s in later)
    cached_later = sum(s.cached_tokens for s in later)
    results_all = [res for r in results for s in r.steps for res in s.results]
    # per step >= 2: tokens of the previous step (prompt + output) not served from the cache
    pairs = [(prev, s) for r in results for prev, s in zip(r.steps, r.steps[1:])]
    missed_prev = [max(0, p.prompt_tokens + p.completion_tokens - s.cached_tokens) for p, s in pairs]
    append_only_ok = sum(m == 0 for m in missed_prev)
    new_tokens = [s.prompt_tokens - p.prompt_tokens - p.completion_tokens for p, s in pairs]
    return {
        "runs": len(results),
        "completed": sum(r.status == "completed" for r in results),
        "steps": sum(len(r.steps) for r in results),
        "ttft_step1_p50_ms": 1000 * _pct([s.ttft_s for s in first], 0.5),
        "ttft_step2plus_p50_ms": 1000 * _pct(later_ttft, 0.5),
        "ttft_step2plus_p95_ms": 1000 * _pct(later_ttft, 0.95),
        "cached_share_step2plus": cached_later / prompt_later if prompt_later else 0.0,
        "prompt_tokens_step2plus": prompt_later,
        "prev_step_tokens_missed_p50": _pct(missed_prev, 0.5),
        "prev_step_tokens_missed_max": max(missed_prev, default=0),
        "append_only_steps_ok": append_only_ok,  # steps n >= 2 with cached >= all of step n-1
        "append_only_steps": len(pairs),
        "new_tokens_per_step_p50": _pct(new_tokens, 0.5),
        "new_tokens_per_step_mean": statistics.fmean(new_tokens) if new_tokens else 0.0,
        "decode_ms_per_step_p50": 1000 * _pct([s.decode_s for r in results for s in r.steps], 0.5),
        "forced_share": (sum(s.forced_tokens for r in results for s in r.steps)
                         / max(1, sum(s.completion_tokens for r in results for s in r.steps))),
        "tool_calls": len(results_all),
        "tool_errors": sum(res.is_error for res in results_all),
        "unusable_turns": sum(s.error is not None for r in results for s in r.steps),
        "total_s": wall_s,
    }


async def run_task(llm: LLM, task: AgentTask, tools: Any, params: GenerationParams) -> RunResult:
    """One task on one engine: the scheduled calls, then the answer."""
    from agentrt.planner import Agent

    # No repeat guard: the schedule fixes the steps, so both engines do exactly the same work.
    agent = Agent(llm, tools, tool_choice=task.tool_choice, parallel_tool_calls=False,
                  max_steps=len(task.plan) + 1, params=params, repeat_guard=False)
    return await agent.run(task.question)


async def run_side_by_side(
    engines: dict[str, LLM], tasks: list[AgentTask], tools: Any, params: GenerationParams,
    on_run: Callable[[str, AgentTask, RunResult], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every task on every engine in turn; a summary per engine name."""
    results: dict[str, list[RunResult]] = {name: [] for name in engines}
    wall: dict[str, float] = {name: 0.0 for name in engines}
    for task in tasks:
        for name, llm in engines.items():
            t0 = time.perf_counter()
            result = await run_task(llm, task, tools, params)
            wall[name] += time.perf_counter() - t0
            results[name].append(result)
            if on_run is not None:
                on_run(name, task, result)
    return {name: summarize(results[name], wall[name]) for name in engines}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="3 tasks only (a smoke test)")
    parser.add_argument("--tasks", type=int, default=None, metavar="N", help="the first N tasks")
    parser.add_argument("--model", default=None, metavar="PATH", help="default: the embedded SmolLM2-135M")
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens per step (default 96)")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    parser.add_argument("--verbose", action="store_true", help="print every run's calls and answer")
    parser.add_argument("--eager", action="store_true",
                        help="instead: tool calls started while the model decodes vs after its turn "
                        "(agentrt.benchmarks.eager)")
    parser.add_argument("--repeats", type=int, default=3, help="with --eager: pairs per question (default 3)")


def main(args: argparse.Namespace) -> int:
    import anyio
    from rich.console import Console
    from rich.table import Table

    from agentrt.llm import LocalLLM
    from agentrt.tools import builtin_registry

    console = Console(stderr=args.json)
    if args.eager:
        from agentrt.benchmarks import eager

        return eager.run(args, console)
    tasks = list(TASKS[: 3 if args.quick else (args.tasks or len(TASKS))])
    root = make_workspace()
    tools = builtin_registry(root)
    with console.status("loading two engines (prefix cache on / off)..."):
        engines: dict[str, LLM] = {
            "cache on": LocalLLM(args.model, enable_prefix_caching=True),
            "cache off": LocalLLM(args.model, enable_prefix_caching=False),
        }
    params = GenerationParams(max_tokens=args.max_tokens)

    def on_run(name: str, task: AgentTask, result: RunResult) -> None:
        ttfts = " ".join(f"{s.ttft_s * 1000:.0f}" for s in result.steps)
        console.print(f"[dim]{task.name:12s} {name:9s} {result.status:9s} ttft/step ms: {ttfts}[/]", highlight=False)
        if args.verbose:
            for s in result.steps:
                what = [f"{c.name}({json.dumps(c.arguments)}) -> {r.content[:60]}" for c, r in zip(s.calls, s.results)]
                console.print(f"    {s.index}: {'; '.join(what) or s.answer or s.error}", highlight=False, markup=False)

    try:
        summaries = anyio.run(run_side_by_side, engines, tasks, tools, params, on_run)
    finally:
        for llm in engines.values():
            shutdown = getattr(getattr(llm, "engine", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
    on, off = summaries["cache on"], summaries["cache off"]
    speedup = off["ttft_step2plus_p50_ms"] / on["ttft_step2plus_p50_ms"] if on["ttft_step2plus_p50_ms"] else 0.0
    verdict = {
        "append_only_all_steps": on["append_only_steps_ok"] == on["append_only_steps"],
        "cached_share_target_0.90": on["cached_share_step2plus"] >= 0.90,
        "ttft_speedup_step2plus_p50": speedup,
        "ttft_speedup_target_5x": speedup >= 5.0,
    }
    if args.json:
        print(json.dumps({"tasks": len(tasks), "engines": summaries, "verdict": verdict}, indent=2))
        return 0
    table = Table(title=f"agent bench: {len(tasks)} tasks x {len(tasks[0].plan) + 1} steps, side by side")
    table.add_column("")
    for name in summaries:
        table.add_column(name, justify="right")
    rows = [
        ("runs completed", lambda s: f"{s['completed']}/{s['runs']}"),
        ("TTFT step 1 p50 ms", lambda s: f"{s['ttft_step1_p50_ms']:.0f}"),
        ("TTFT steps>=2 p50 ms", lambda s: f"{s['ttft_step2plus_p50_ms']:.0f}"),
        ("TTFT steps>=2 p95 ms", lambda s: f"{s['ttft_step2plus_p95_ms']:.0f}"),
        ("cached share steps>=2", lambda s: f"{s['cached_share_step2plus']:.1%}"),
        ("steps>=2 cached >= all of step n-1", lambda s: f"{s['append_only_steps_ok']}/{s['append_only_steps']}"),
        ("prev step tokens not cached p50/max", lambda s: f"{s['prev_step_tokens_missed_p50']:.0f} / "
                                                          f"{s['prev_step_tokens_missed_max']:.0f}"),
        ("new tokens per step p50/mean", lambda s: f"{s['new_tokens_per_step_p50']:.0f} / "
                                                   f"{s['new_tokens_per_step_mean']:.0f}"),
        ("decode ms/step p50", lambda s: f"{s['decode_ms_per_step_p50']:.0f}"),
        ("forced token share", lambda s: f"{s['forced_share']:.1%}"),
        ("tool calls (errors)", lambda s: f"{s['tool_calls']} ({s['tool_errors']})"),
        ("total run time s", lambda s: f"{s['total_s']:.1f}"),
    ]
    for label, fmt in rows:
        table.add_row(label, *(fmt(s) for s in summaries.values()))
    console.print(table)
    console.print(
        f"steps>=2 TTFT speedup with the prefix cache: {speedup:.1f}x (target 5x: "
        f"{'met' if verdict['ttft_speedup_target_5x'] else 'NOT met'}); cached share "
        f"{on['cached_share_step2plus']:.1%} (target 90%: {'met' if verdict['cached_share_target_0.90'] else 'NOT met'}); "
        f"append-only (cached[n] >= prompt[n-1] + output[n-1]): {on['append_only_steps_ok']} of "
        f"{on['append_only_steps']} steps"
    )
    return 0
