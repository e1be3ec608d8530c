"""The flags `agentrt run`, `agentrt serve` and `agentrt mcp` share for the outside world: ``--mcp``
(tools from MCP servers) and ``--otel-endpoint`` (OpenTelemetry traces)."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_integration_arguments(parser: argparse.ArgumentParser, *, mcp_client: bool = True) -> None:
    if mcp_client:
        parser.add_argument(
            "--mcp", action="append", metavar="COMMAND|URL",
            help="also offer the tools of this MCP server: a command line that starts it over stdio (e.g. "
            "'uvx mcp-server-time') or its streamable HTTP URL (repeatable; needs agentrt[mcp]). Tools whose "
            "schemas the grammar cannot enforce are left out, each named in a warning")
    parser.add_argument("--otel-endpoint", default=None, metavar="URL",
                        help="export OpenTelemetry traces over OTLP/HTTP to URL (e.g. http://127.0.0.1:4318; needs "
                        "agentrt[otel]); default: as the OTEL_* environment variables say (off when unset)")


def start_tracing(args: argparse.Namespace, command: str) -> bool:
    """Turn tracing on if ``--otel-endpoint`` or the ``OTEL_*`` variables ask for it; False (with a message)
    when they ask for it but the SDK is missing."""
    from agentrt.tracing import configure_tracing

    try:
        configure_tracing(args.otel_endpoint)
    except ImportError as exc:
        print(f"agentrt {command}: {exc}", file=sys.stderr)
        return False
    return True


def open_mcp_servers(args: argparse.Namespace, registry: Any, command: str) -> list[Any] | None:
    """Connect to each ``--mcp`` server and add its tools to ``registry``; the clients (close them at
    the end), or None after printing why one could not be used."""
    if not args.mcp:
        return []
    try:
        from agentrt.mcp_client import MCPClient, MCPError
    except ImportError as exc:
        print(f"agentrt {command}: {exc}", file=sys.stderr)
        return None
    clients: list[Any] = []
    try:
        for server in args.mcp:
            client = MCPClient(server, skip_unsupported=True)
            clients.append(client)
            for tool in client.tools:
                registry.register(tool)
    except (MCPError, ValueError) as exc:  # ValueError: a tool name taken by another server or tool
        for client in clients:
            client.close()
        print(f"agentrt {command}: --mcp: {exc}", file=sys.stderr)
        return None
    return clients
