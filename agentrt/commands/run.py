"""`agentrt run "question"`: an agent on the local model answers by calling tools, step by step."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from agentrt.commands.engine_options import add_engine_arguments, engine_overrides
from agentrt.commands.integrations import add_integration_arguments, open_mcp_servers, start_tracing
from agentrt.types import AgentEvent, RunResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="what to ask the agent")
    parser.add_argument(
        "--tools", action="append", metavar="MODULE:ATTR",
        help="tools to offer: a ToolRegistry, a @tool function or a list of them (repeatable); "
        "default: the built-in tools (none with --mcp)",
    )
    parser.add_argument("--only", default=None, metavar="NAME[,NAME...]",
                        help="offer only these of the loaded tools (a small model chooses better among few)")
    parser.add_argument("--parallel", action="store_true",
                        help="allow several tool calls per turn (default: one call per turn)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="HF folder, .safetensors or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-steps", type=int, default=8, help="most model turns (default 8)")
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens per turn (default 256)")
    # A small model answers from memory when it may; "required" makes the first step call a
    # tool (the planner then switches to "auto" so the model can answer with the results).
    parser.add_argument("--tool-choice", default="required",
                        help="first step: required (default) | auto | none | a tool name")
    parser.add_argument("--system", default=None, help="extra system instructions")
    parser.add_argument("--json", action="store_true",
                        help="print each event as one JSON line (the last is run_finished with the result)")
    parser.add_argument("--no-prefix-cache", action="store_true", help="turn the engine's prefix cache off")
    add_engine_arguments(parser)
    add_integration_arguments(parser)


def load_tools(specs: list[str] | None) -> Any:
    """A ToolRegistry from ``module:attr`` specs (default: the built-in tools)."""
    from agentrt.registry import Tool, ToolRegistry

    if not specs:
        from agentrt.tools import builtin_registry

        return builtin_registry()
    registry = ToolRegistry()
    for spec in specs:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise SystemExit(f"agentrt run: --tools expects MODULE:ATTR (e.g. mypkg.tools:registry), got {spec!r}")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"agentrt run: cannot load --tools {spec!r}: {exc}") from None
        if isinstance(obj, ToolRegistry):
            items: list[Any] = list(obj)
        elif isinstance(obj, (list, tuple)):
            items = list(obj)
        elif isinstance(obj, Tool) or callable(obj):
            items = [obj]
        else:
            raise SystemExit(f"agentrt run: {spec!r} is a {type(obj).__name__}, not a registry, tool or list of tools")
        for item in items:
            registry.register(item)
    return registry


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_event(console: Any, event: AgentEvent) -> None:
    """Human-readable line(s) for one agent event."""
    kind = event.type
    if kind == "tool_call":
        console.print(f"  [bold cyan]call[/] {event.call.name}({_short(event.call.arguments)})", highlight=False)
    elif kind == "tool_result":
        r = event.result
        style = "red" if r.is_error else "green"
        console.print(f"  [{style}]{'error' if r.is_error else 'result'}[/] {_short(r.content)}"
                      f"  [dim]({r.duration_s * 1000:.0f} ms)[/]", highlight=False)
    elif kind == "step_finished":
        s = event.step
        if s.error:
            console.print(f"  [yellow]unusable reply[/] {_short(s.error)} - fed back to the model", highlight=False)
        console.print(
            f"[dim]step {s.index}: ttft {s.ttft_s * 1000:.0f} ms, decode {s.decode_s * 1000:.0f} ms, "
            f"prompt {s.prompt_tokens} tok ({s.cached_tokens} cached), {s.completion_tokens} generated "
            f"({s.forced_tokens} forced, {s.draft_tokens} from drafts), tools {s.tool_time_s * 1000:.0f} ms[/]",
            highlight=False,
        )
    elif kind == "step_started":
        console.print(f"[bold]step {event.step}[/]")


def print_result(console: Any, result: RunResult) -> None:
    if result.status == "completed":
        console.print(f"[bold green]answer:[/] {_short(result.answer, 2000)}", highlight=False)
    else:
        console.print(f"[bold red]{result.status}:[/] {result.error}", highlight=False)
    u = result.usage
    share = u.cached_tokens / u.prompt_tokens if u.prompt_tokens else 0.0
    console.print(
        f"[dim]{len(result.steps)} steps in {result.duration_s:.2f} s; prompt tokens {u.prompt_tokens} "
        f"({share:.0%} from the prefix cache), generated {u.completion_tokens}[/]",
        highlight=False,
    )


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from agentrt.registry import ToolRegistry

    console = Console(stderr=args.json)
    if not start_tracing(args, "run"):
        return 2
    registry = load_tools(args.tools) if args.tools or not args.mcp else ToolRegistry()
    mcp_clients = open_mcp_servers(args, registry, "run")
    if mcp_clients is None:
        return 2
    try:
        return _run(args, console, registry)
    finally:
        for client in mcp_clients:
            client.close()


def _run(args: argparse.Namespace, console: Any, registry: Any) -> int:
    import anyio

    from agentrt.llm import GenerationParams, LocalLLM
    from agentrt.planner import Agent

    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in registry]
        if unknown:
            console.print(f"[red]agentrt run: --only names unknown tools {unknown}; known: {registry.names}[/]")
            return 2
        registry = registry.subset(names)
    with console.status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}..."):
        try:
            llm = LocalLLM(args.model, enable_prefix_caching=not args.no_prefix_cache, **engine_overrides(args))
        except ValueError as exc:  # an engine setting that cannot work (EngineConfig names it)
            console.print(f"[red]agentrt run: {exc}[/]")
            return 2
    try:
        agent = Agent(
            llm,
            registry,
            system_prompt=args.system,
            tool_choice=args.tool_choice,
            parallel_tool_calls=args.parallel,
            max_steps=args.max_steps,
            params=GenerationParams(max_tokens=args.max_tokens),
        )
    except ValueError as exc:
        console.print(f"[red]agentrt run: {exc}[/]")
        return 2
    if not args.json:
        console.print(f"[dim]model {llm.model_name} ({llm.engine_summary}); tools: {', '.join(registry.names)}[/]",
                      highlight=False)

    async def go() -> RunResult:
        result: RunResult | None = None
        async for event in agent.astream(args.question):
            if args.json:
                sys.stdout.write(event.model_dump_json() + "\n")
                sys.stdout.flush()
            else:
                print_event(console, event)
            if event.type == "run_finished":
                result = event.result
        assert result is not None
        return result

    try:
        result = anyio.run(go)
    finally:
        shutdown = getattr(getattr(llm, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
    if not args.json:
        print_result(console, result)
    return 0 if result.status == "completed" else 1
