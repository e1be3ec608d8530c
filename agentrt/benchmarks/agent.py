"""`agentrt bench agent`: multi-step agent runs with the prefix cache on vs off, side by side.

A fixed suite of tasks, each a question answered in 4 steps: three tool calls then the
final answer, on the built-in tools. Each task's tool for each step is fixed by a
tool_choice schedule (the model picks the arguments; the grammar forces the rest), so
both engines do the same number of steps on the same prompts and the comparison is of
the engine alone. Tasks run in turn on three engines in this one process (cache on, cache
off, and cache on without prompt-lookup speculation, task by task, so machine noise hits all
alike).

Reported per engine: TTFT p50/p95 of steps >= 2 (step 1 separately), the share of
prompt tokens at steps >= 2 served from the prefix cache, tool-call errors, total time.
Targets: cached share at steps >= 2 >= 90%; steps >= 2 TTFT >= 5x lower with the cache. The
third engine gives the whole runs' time and the decode time per step with speculation vs without.

Append-only prompting is checked step by step: the criterion is that every step n >= 2 is
served at least all of step n-1's tokens from the cache (cached_tokens[n] >= prompt_tokens[n-1]
+ completion_tokens[n-1]); the bench prints how many steps meet it, and how many of the
previous step's tokens the others missed. Also reported: how many tokens each step adds (the
tool results and the chat template's turn markers), which no cache can serve.
"""
from __future__ import annotations

import argparse
import json

from agentrt.benchmarks.agent_suite import TASKS, AgentTask, make_workspace, run_side_by_side
from agentrt.llm import LLM, GenerationParams
from agentrt.types import RunResult



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
    parser.add_argument("--pins", action="store_true",
                        help="instead: KV pinned through tool calls vs not, many runs on a small pool "
                        "(agentrt.benchmarks.pins)")
    parser.add_argument("--peer", choices=["llamacpp"], default=None,
                        help="instead: ours vs llama-cpp-python's server on the same GGUF, one at a time and "
                        "--concurrency at once (agentrt.benchmarks.agent_peer)")
    parser.add_argument("--threads", type=int, default=2, help="with --peer: threads of each side (default 2)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="runs at once: with --pins (default 16), with --peer (default 8)")
    parser.add_argument("--kv-runs", type=int, default=8, help="with --pins: runs the KV pool holds (default 8)")
    parser.add_argument("--tool-delay-ms", type=float, default=200.0,
                        help="with --pins: added to every tool call (default 200)")
    parser.add_argument("--churn-clients", type=int, default=2,
                        help="with --pins: clients sending one-off requests beside the runs (default 2)")


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
    if args.pins:
        from agentrt.benchmarks import pins

        args.concurrency = args.concurrency or 16
        return pins.run(args, console)
    if args.peer:
        from agentrt.benchmarks import agent_peer

        args.concurrency = args.concurrency or 8
        return agent_peer.run(args, console)
    tasks = list(TASKS[: 3 if args.quick else (args.tasks or len(TASKS))])
    root = make_workspace()
    tools = builtin_registry(root)
    with console.status("loading three engines (prefix cache on / off, speculation off)..."):
        engines: dict[str, LLM] = {
            "cache on": LocalLLM(args.model, enable_prefix_caching=True),
            "cache off": LocalLLM(args.model, enable_prefix_caching=False),
            "no speculation": LocalLLM(args.model, num_speculative_tokens=0),
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
    on, off, plain = summaries["cache on"], summaries["cache off"], summaries["no speculation"]
    speedup = off["ttft_step2plus_p50_ms"] / on["ttft_step2plus_p50_ms"] if on["ttft_step2plus_p50_ms"] else 0.0
    verdict = {
        "run_time_ratio_speculation": on["total_s"] / plain["total_s"] if plain["total_s"] else 0.0,
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
        ("tokens from speculative drafts", lambda s: f"{s['draft_share']:.1%}"),
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
        f"{on['append_only_steps']} steps; whole runs with speculation / without: "
        f"{verdict['run_time_ratio_speculation']:.2f}x"
    )
    return 0
