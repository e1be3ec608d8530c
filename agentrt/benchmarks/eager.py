"""`agentrt bench agent --eager`: tool calls started while the model decodes vs after its turn, side by side.

Each question asks for several cities' populations; the model (asked to make one call per city in
one reply) writes its calls under the grammar, and a lookup tool takes 300 ms per call. Two tool
back-ends: ``parallel`` (independent calls run at once) and ``serial`` (one call at a time, as a
rate-limited API allows). Every question runs with eager tools on and off, in alternating order,
``--repeats`` times each, on the same engine with the prefix cache off (so each run of a question
decodes the same tokens: greedy on the same prompt). Reported per mode and back-end: step wall time
p50, tool wait after the turn p50, and the tool time hidden behind decoding per call beyond the
first. Runs whose calls differ between the modes are counted and left out.

What to expect: with parallel calls of equal length the last call, written last, still runs after
the turn, so the step's wall time gains only the turn's tail; the hidden time is what ran during
decoding. With serial calls every hidden call is time off the step.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any

import anyio

from agentrt.llm import LLM, GenerationParams
from agentrt.registry import ToolRegistry

TOOL_SECONDS = 0.3
SYSTEM = 'Make one lookup_population call per city, all in the same reply: {"calls":[{...},{...},{...}]}.'
QUESTIONS = (
    "Populations of Berlin, Madrid, Rome?",
    "Find the population of each of these cities: Cairo, Lagos, Nairobi.",
    "What are the populations of Lima, Quito and Bogota?",
    "Populations of Oslo, Helsinki and Stockholm?",
    "Find the population of each of these cities: Delhi, Dhaka, Karachi.",
    "Populations of Toronto, Chicago, Denver and Seattle?",
)


def lookup_registry(serial: bool) -> ToolRegistry:
    """A 300 ms population lookup; ``serial``: one call at a time (a rate-limited API)."""
    gate = anyio.Semaphore(1 if serial else 1_000)
    registry = ToolRegistry()

    @registry.tool
    async def lookup_population(city: str) -> str:
        """Look up the population of one city."""
        async with gate:
            await anyio.sleep(TOOL_SECONDS)
        return f"{city}: about 1.2 million"

    return registry


async def one_run(llm: LLM, registry: ToolRegistry, question: str, eager: bool, max_tokens: int) -> dict[str, Any]:
    from agentrt.planner import Agent

    agent = Agent(llm, registry, system_prompt=SYSTEM, tool_choice="required", max_steps=1, eager_tools=eager,
                  params=GenerationParams(max_tokens=max_tokens))
    started = time.perf_counter()
    result = await agent.run(question)
    wall = time.perf_counter() - started
    step = result.steps[0]
    return {"calls": [(c.name, json.dumps(c.arguments, sort_keys=True)) for c in step.calls], "wall_s": wall,
            "tool_wait_s": step.tool_time_s, "hidden_s": step.tool_time_hidden_s, "decode_s": step.decode_s}


async def measure(llm: LLM, repeats: int, max_tokens: int) -> dict[str, Any]:
    """Both modes on each question and back-end, alternating which goes first."""
    out: dict[str, Any] = {}
    for backend in ("parallel", "serial"):
        registry = lookup_registry(serial=backend == "serial")
        pairs, mismatched = [], 0
        for question in QUESTIONS:
            await one_run(llm, registry, question, True, max_tokens)  # warm: grammar and prompt caches
            for r in range(repeats):
                order = (True, False) if r % 2 == 0 else (False, True)
                runs = {eager: await one_run(llm, registry, question, eager, max_tokens) for eager in order}
                if runs[True]["calls"] != runs[False]["calls"]:
                    mismatched += 1
                    continue
                pairs.append(runs)
        out[backend] = summarize(pairs, mismatched)
    return out


def summarize(pairs: list[dict[bool, dict[str, Any]]], mismatched: int) -> dict[str, Any]:
    def p50(eager: bool, key: str) -> float:
        return statistics.median(p[eager][key] for p in pairs) if pairs else 0.0

    multi = [p for p in pairs if len(p[True]["calls"]) >= 2]
    hidden_per_extra = [p[True]["hidden_s"] / (len(p[True]["calls"]) - 1) for p in multi]
    return {
        "runs": len(pairs), "mismatched": mismatched,
        "calls_per_turn_p50": statistics.median(len(p[True]["calls"]) for p in pairs) if pairs else 0,
        "wall_eager_p50_s": p50(True, "wall_s"), "wall_after_p50_s": p50(False, "wall_s"),
        "tool_wait_eager_p50_s": p50(True, "tool_wait_s"), "tool_wait_after_p50_s": p50(False, "tool_wait_s"),
        "decode_p50_s": p50(True, "decode_s"),
        "hidden_per_extra_call_p50_s": statistics.median(hidden_per_extra) if hidden_per_extra else 0.0,
        "wall_ratio": (p50(True, "wall_s") / p50(False, "wall_s")) if pairs else 0.0,
    }


def run(args: Any, console: Any) -> int:
    from rich.table import Table

    from agentrt.llm import LocalLLM

    with console.status("loading the engine (prefix cache off: each run decodes the same tokens)..."):
        llm = LocalLLM(args.model, enable_prefix_caching=False)
    try:
        summary = anyio.run(measure, llm, args.repeats, args.max_tokens)
    finally:
        llm.close()
    if args.json:
        print(json.dumps({"tool_seconds": TOOL_SECONDS, "questions": len(QUESTIONS), "backends": summary}, indent=2))
        return 0
    table = Table(title=f"eager tools: {len(QUESTIONS)} questions x {args.repeats} pairs, a {TOOL_SECONDS * 1000:.0f} ms "
                        f"tool, side by side")
    table.add_column("")
    for backend in summary:
        table.add_column(f"{backend}: eager", justify="right")
        table.add_column(f"{backend}: after turn", justify="right")
    rows = [("step wall p50 ms", "wall_eager_p50_s", "wall_after_p50_s"),
            ("tool wait after the turn p50 ms", "tool_wait_eager_p50_s", "tool_wait_after_p50_s")]
    for label, eager_key, after_key in rows:
        table.add_row(label, *(f"{s[k] * 1000:.0f}" for s in summary.values() for k in (eager_key, after_key)))
    console.print(table)
    for backend, s in summary.items():
        console.print(f"{backend}: {s['runs']} pairs ({s['mismatched']} left out: calls differed), calls per turn p50 "
                      f"{s['calls_per_turn_p50']}, decode p50 {s['decode_p50_s'] * 1000:.0f} ms, tool time hidden "
                      f"per call beyond the first p50 {s['hidden_per_extra_call_p50_s'] * 1000:.0f} ms, wall "
                      f"eager/after {s['wall_ratio']:.2f}", highlight=False)
    return 0
