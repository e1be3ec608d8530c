"""Turn grammars over tool sets (`agentrt bench grammar --tool-turns N`): N tools from BFCL_multiple
compiled cold as one turn (the grammar `plan_turn` gives the model: any of them, one or more calls,
or an answer), then turns offering new subsets of those already-seen tools, each compiled through
`GrammarCompiler` (its compile workers) as `LocalLLM` compiles a step's grammar."""
from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any


def bfcl_tools(cases: list[dict]) -> list:
    """The distinct tools of BFCL_multiple cases (each schema: anyOf {"<tool name>": <arguments>})."""
    from agentrt.types import ToolSpec

    tools: dict[str, ToolSpec] = {}
    for case in cases:
        for branch in case["schema"].get("anyOf", []):
            (name, params), = branch["properties"].items()
            tools.setdefault(name, ToolSpec(name=name, parameters=params))
    return list(tools.values())


def run_tool_turns(tok: Any, tools: list, n_tools: int, subset_size: int = 5, turns: int = 10,
                   timeout_s: float = 120.0, out=sys.stdout) -> dict:
    """Cold compile of ``n_tools`` as one turn, then ``turns`` turns of ``subset_size`` of them."""
    from agentrt.engine.grammar import GrammarCompiler
    from agentrt.engine.grammar.automaton import run_bounded
    from agentrt.prompting import plan_turn

    tools = tools[:n_tools]
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as cache:
        comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=cache)
        comp.compile_json_schema({"type": "object", "properties": {"a": {"type": "string"}}})
        # (that compile ran in this process) a job in a worker: the cold compile below does not wait for its start
        run_bounded(os.getpid, timeout_s)
        t0 = time.perf_counter()
        whole = comp.compile_json_schema(plan_turn([], tools).json_schema, timeout_s=timeout_s)
        cold_ms = (time.perf_counter() - t0) * 1e3
        times = []
        for _ in range(turns):
            schema = plan_turn([], rng.sample(tools, min(subset_size, len(tools)))).json_schema
            t0 = time.perf_counter()
            comp.compile_json_schema(schema, timeout_s=timeout_s)
            times.append((time.perf_counter() - t0) * 1e3)
    report = {"tools": len(tools), "cold_ms": cold_ms, "states": whole.dfa.num_states,
              "subset_size": subset_size, "turn_ms": times}
    print(f"\ntool turns: {len(tools)} tools as one turn grammar cold {cold_ms:.0f} ms ({whole.dfa.num_states:,} DFA "
          f"states); {turns} turns of {subset_size} of them: median {statistics.median(times):.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f})", file=out)
    return report
