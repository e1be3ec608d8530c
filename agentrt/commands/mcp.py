"""`agentrt mcp`: serve the tools, and `agent_run` (the whole agent on the local model), over MCP.

Over stdio (the default: what Claude Desktop, Cursor and other MCP hosts start) or streamable HTTP
(``--transport http``, at ``http://HOST:PORT/mcp``). The model loads on the first ``agent_run``.
"""
from __future__ import annotations

import argparse
import os
import sys

from agentrt.commands.engine_options import add_engine_arguments, engine_overrides
from agentrt.commands.integrations import add_integration_arguments, start_tracing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                        help="stdio (default) or streamable HTTP")
    parser.add_argument("--host", default="127.0.0.1", help="with --transport http: interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="with --transport http: port (default 8001)")
    parser.add_argument("--tools", action="append", metavar="MODULE:ATTR",
                        help="tools to serve: a ToolRegistry, a @tool function or a list of them (repeatable); "
                        "default: the built-in tools that read no files")
    parser.add_argument("--files-root", default=None, metavar="DIR",
                        help="also serve the built-in file and data tools, confined to DIR")
    parser.add_argument("--no-agent", action="store_true", help="serve the tools only (no agent_run, no model)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="agent_run's model: HF folder, .safetensors or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-steps", type=int, default=8, help="agent_run: most model turns (default 8)")
    parser.add_argument("--max-tokens", type=int, default=256, help="agent_run: new tokens per turn (default 256)")
    parser.add_argument("--tool-choice", default="required",
                        help="agent_run's first step: required (default) | auto | none | a tool name")
    add_engine_arguments(parser)
    add_integration_arguments(parser, mcp_client=False)


def main(args: argparse.Namespace) -> int:
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("agentrt mcp: needs the 'mcp' package: pip install 'agentrt[mcp]'", file=sys.stderr)
        return 2
    from agentrt.commands.run import load_tools
    from agentrt.mcp_server import LazyLLM, build_mcp_server
    from agentrt.server import default_server_registry

    if args.files_root is not None and not os.path.isdir(args.files_root):
        print(f"agentrt mcp: --files-root {args.files_root!r} is not a folder", file=sys.stderr)
        return 2
    if not start_tracing(args, "mcp"):
        return 2
    registry = load_tools(args.tools) if args.tools else default_server_registry(args.files_root)
    llm = None if args.no_agent else LazyLLM(lambda: _local_llm(args))
    server = build_mcp_server(registry, llm, max_steps=args.max_steps, max_tokens=args.max_tokens,
                              tool_choice=args.tool_choice)
    try:
        if args.transport == "stdio":
            import anyio

            anyio.run(_serve_stdio, server)
        else:
            import uvicorn

            uvicorn.run(server.streamable_http_app(host=args.host), host=args.host, port=args.port,
                        log_level="warning")
    except KeyboardInterrupt:
        return 130
    finally:
        if llm is not None:
            llm.close()
    return 0


def _local_llm(args: argparse.Namespace):
    from agentrt.llm import LocalLLM

    return LocalLLM(args.model, **engine_overrides(args))


async def _serve_stdio(server) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())
