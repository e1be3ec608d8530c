"""The agent bench's task suite: questions answered in 4 steps on the built-in tools (three scheduled
tool calls, then the answer), the files they read, one run of a task, and the per-engine summary.
Shared by `agentrt bench agent` and its --pins variant."""
from __future__ import annotations

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
        "draft_share": (sum(s.draft_tokens for r in results for s in r.steps)
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
    summary: Callable[[list[RunResult], float], dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every task on every engine in turn; a summary per engine name (`summarize` unless given)."""
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
    return {name: (summary or summarize)(results[name], wall[name]) for name in engines}
