"""`agentrt` command line: run | serve | mcp | pull | bench {engine,grammar,agent,server} | eval bfcl.

Each subcommand lives in its own module and is imported only when used, so
`agentrt --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module defines `add_arguments(parser)` and `main(args) -> int`
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("agentrt.commands.run", "answer a question with an agent that calls tools"),
    "serve": ("agentrt.commands.serve", "serve /agent/run and the OpenAI-compatible API"),
    "pull": ("agentrt.commands.pull", "convert a model (GGUF -> safetensors cache) ahead of use"),
    "mcp": ("agentrt.commands.mcp", "serve the tools and an agent_run tool over MCP (stdio or streamable HTTP)"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "engine": ("agentrt.benchmarks.engine", "engine decode/prefill/prefix-cache/batching vs transformers and llama.cpp"),
    "grammar": ("agentrt.benchmarks.grammar", "grammar coverage, exactness and speed on shared schemas"),
    "agent": ("agentrt.benchmarks.agent", "multi-step agent tasks: per-step TTFT with and without prefix cache"),
    "server": ("agentrt.benchmarks.server", "loopback load on the HTTP server, and RemoteLLM scale-out"),
}
EVALS: dict[str, tuple[str, str]] = {
    "bfcl": ("agentrt.benchmarks.bfcl", "BFCL AST accuracy and valid-call rate, constrained vs not"),
}


def _add_group(sub: argparse._SubParsersAction, table: dict[str, tuple[str, str]]) -> None:
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not built yet
            if e.name != module:
                raise
            p.set_defaults(_missing=True)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Only import the module of the subcommand being run (heavy imports: torch).
    wanted = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            _add_group(sub, {name: (module, help_text)})
        else:
            sub.add_parser(name, help=help_text)
    for group, table in (("bench", BENCHES), ("eval", EVALS)):
        gp = sub.add_parser(group, help=f"{group} subcommands")
        gsub = gp.add_subparsers(dest="target", required=True)
        if wanted == group:
            _add_group(gsub, table)
        else:
            for name, (_, help_text) in table.items():
                gsub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"agentrt: '{' '.join(argv[:2])}' is not available in this build", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
