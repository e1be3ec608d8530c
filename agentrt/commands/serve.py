"""`agentrt serve`: the HTTP server (``/agent/run`` + the OpenAI-compatible API) on uvicorn.

The model is loaded once when the server starts; every request shares it. Bind to
127.0.0.1 (the default) unless the server is behind a proxy or has ``--api-key``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from agentrt.commands.engine_options import add_engine_arguments, engine_overrides
from agentrt.commands.integrations import add_integration_arguments, open_mcp_servers, start_tracing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="HF folder, .safetensors or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--remote-url", default=None, metavar="URL",
                        help="generate on this OpenAI-compatible server (vLLM, SGLang, another agentrt) "
                        "instead of a local model; tools and the planner stay here")
    parser.add_argument("--remote-api-key", default=None, help="API key of --remote-url (default $OPENAI_API_KEY)")
    parser.add_argument("--remote-constrain", default="auto",
                        choices=["auto", "json_schema", "json_object_schema", "tools", "none"],
                        help="how --remote-url is asked to follow the step's JSON Schema: auto (default: found out "
                        "at the first request), json_schema (vLLM, SGLang, llama-server), json_object_schema "
                        "(llama-cpp-python), tools (a forced function tool), none (unconstrained)")
    parser.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the model's)")
    parser.add_argument("--tools", action="append", metavar="MODULE:ATTR",
                        help="tools /agent/run may run: a ToolRegistry, a @tool function or a list of them "
                        "(repeatable); default: the built-in tools that read no files (none with --mcp)")
    parser.add_argument("--files-root", default=None, metavar="DIR",
                        help="also offer the built-in file and data tools, confined to DIR")
    parser.add_argument("--api-key", action="append", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (repeatable; also $AGENTRT_API_KEYS, comma-separated)")
    parser.add_argument("--public-docs", action="store_true",
                        help="with --api-key, still serve /docs, /redoc and /openapi.json without a key")
    parser.add_argument("--max-concurrent", type=int, default=32, help="requests served at once (default 32)")
    parser.add_argument("--max-queue", type=int, default=128,
                        help="requests waiting beyond those; more get 429 + Retry-After (default 128)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    add_engine_arguments(parser)
    add_integration_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from ``--api-key`` and ``$AGENTRT_API_KEYS``."""
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("AGENTRT_API_KEYS", "").split(",") if k.strip()]
    return keys


def main(args: argparse.Namespace) -> int:
    from agentrt.commands.run import load_tools
    from agentrt.registry import ToolRegistry
    from agentrt.server import default_server_registry

    if not 0 < args.port < 65536:
        print(f"agentrt serve: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.model and args.remote_url:
        print("agentrt serve: give --model or --remote-url, not both", file=sys.stderr)
        return 2
    if args.remote_url and engine_overrides(args):
        print("agentrt serve: --quantization / --threads / --kv-cache-gb / --kv-cache-dtype / --max-model-len set the local engine; "
              "--remote-url has none", file=sys.stderr)
        return 2
    if args.model and not os.path.exists(args.model):
        print(f"agentrt serve: --model {args.model!r} does not exist", file=sys.stderr)
        return 2
    keys = api_keys(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(f"agentrt serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    llm = None
    if args.remote_url:
        from agentrt.remote import RemoteLLM

        llm = RemoteLLM(args.remote_url, model=args.model_name, api_key=args.remote_api_key,
                        constrain=args.remote_constrain)
    if args.files_root is not None and not os.path.isdir(args.files_root):
        print(f"agentrt serve: --files-root {args.files_root!r} is not a folder", file=sys.stderr)
        return 2
    if args.tools:
        registry = load_tools(args.tools)
    elif args.mcp and args.files_root is None:
        registry = ToolRegistry()
    else:
        registry = default_server_registry(args.files_root)
    if not start_tracing(args, "serve"):
        return 2
    mcp_clients = open_mcp_servers(args, registry, "serve")
    if mcp_clients is None:
        return 2
    try:
        _serve(args, llm, registry, keys)
    finally:  # after uvicorn's graceful shutdown: no request can call an MCP tool any more
        for client in mcp_clients:
            client.close()
    return 0


def _serve(args: argparse.Namespace, llm: Any, registry: Any, keys: list[str]) -> None:
    import uvicorn

    from agentrt.server import create_app

    app = create_app(
        llm=llm, registry=registry, api_keys=keys, model=args.model, model_name=args.model_name,
        max_concurrent=args.max_concurrent, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
        public_docs=args.public_docs,
        # every request let in decodes at once: none waits inside the engine for a batch slot held by
        # a long generation (max_num_seqs is 16 otherwise)
        engine_options=engine_overrides(args) | {"max_num_seqs": args.max_concurrent},
    )
    # uvicorn shuts down gracefully on SIGTERM / SIGINT (no new connections, in-flight requests run to
    # their end, then the lifespan closes the engine) and then raises the signal again: by then
    # stopping is the expected end, so the process exits 0 (130 for Ctrl-C), not "killed by SIGTERM"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
