"""`agentrt eval bfcl`: BFCL (simple / irrelevance) tool-call accuracy, grammar on vs off.

Each case gives the model the question and its tools (``tools_openai``) rendered the way
the planner renders them (`agentrt.prompting.plan_turn`), then scores the reply with
BFCL's AST rules (see ``../shared/data/README.md``):

- the same number of calls, each with the right function name;
- every required parameter present, no unknown parameter;
- every value among the accepted ones: strings compared lowercased with spaces and
  ``,./-_*^`` removed; an int accepted for a float; lists element-wise; dicts key-wise;
- a parameter may be left out only when ``""`` is among its accepted values;
- irrelevance cases: correct when no tool is called.

"Constraints on" decodes under the turn's JSON Schema grammar; "off" generates free text
and parses it afterwards (code fences, text around the JSON and bare call objects are
tolerated). A *valid* reply parses as a turn and every call's arguments validate against
its tool's JSON Schema.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from agentrt.llm import LLM, GenerationParams
from agentrt.prompting import PromptPlan, TurnOutput, parse_turn, plan_turn
from agentrt.types import Message, ToolCall, ToolSpec

_STRIP = re.compile(r"[ ,./\-_*^]")


# ---------------------------------------------------------------- data


def load_cases(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a BFCL jsonl file (one case a line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"BFCL data not found: {p} (expected e.g. ../shared/data/bfcl/simple.jsonl)")
    cases = []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    cases.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{p}:{n}: not JSON: {exc}") from None
            if limit is not None and len(cases) >= limit:
                break
    return cases


def case_tools(case: dict[str, Any]) -> list[ToolSpec]:
    """The case's tools as ToolSpecs (from its standard-JSON-Schema ``tools_openai``)."""
    out = []
    for t in case["tools_openai"]:
        fn = t["function"]
        out.append(ToolSpec(name=fn["name"], description=fn.get("description", ""), parameters=fn["parameters"]))
    return out


def case_messages(case: dict[str, Any]) -> list[Message]:
    """The first conversation of the case (BFCL simple/irrelevance have one turn)."""
    return [Message(role=m["role"], content=m["content"]) for m in case["question"][0]]


# ---------------------------------------------------------------- AST scoring


def normalize_string(s: str) -> str:
    """BFCL's string standardisation: lowercase, drop spaces and ``,./-_*^``, ' -> "."""
    return _STRIP.sub("", s).lower().replace("'", '"')


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    t = schema.get("type")
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "string":
        return isinstance(value, str)
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    return True


def values_equal(value: Any, expected: Any, schema: dict[str, Any] | None = None) -> bool:
    """One model value against one accepted value, with BFCL's leniencies."""
    schema = schema or {}
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool) and value == expected
    if isinstance(expected, str):
        return isinstance(value, str) and normalize_string(value) == normalize_string(expected)
    if isinstance(expected, (int, float)):
        if not isinstance(value, (int, float)):
            return False
        if isinstance(expected, float) and isinstance(value, int):
            return float(value) == expected  # an int is accepted for a float
        if isinstance(expected, int) and isinstance(value, float):
            return schema.get("type") == "number" and value == float(expected)
        return value == expected
    if isinstance(expected, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return (
            isinstance(value, list)
            and len(value) == len(expected)
            and all(values_equal(v, e, items) for v, e in zip(value, expected))
        )
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return False
        props = schema.get("properties") or {}
        for key, accepted in expected.items():
            accepted_list = accepted if isinstance(accepted, list) else [accepted]
            if key not in value:
                if "" in accepted_list:
                    continue
                return False
            sub = props.get(key, {})
            if not any(values_equal(value[key], a, sub) for a in accepted_list if a != "" or value[key] == ""):
                return False
        return set(value) <= set(expected)
    return value == expected


def check_call(call: ToolCall, expected_name: str, accepted: dict[str, list[Any]], tool: ToolSpec | None) -> str | None:
    """None if ``call`` matches one ground-truth call, else the reason it does not."""
    if call.name != expected_name:
        return f"wrong function {call.name!r}, expected {expected_name!r}"
    params = (tool.parameters if tool else {}) or {}
    props: dict[str, Any] = params.get("properties") or {}
    required = params.get("required") or []
    for name in required:
        if name not in call.arguments:
            return f"missing required parameter {name!r}"
    for name in call.arguments:
        if name not in accepted and name not in props:
            return f"unknown parameter {name!r}"
    for name, values in accepted.items():
        if name not in call.arguments:
            if "" not in values:
                return f"missing parameter {name!r}"
            continue
        value = call.arguments[name]
        sub = props.get(name, {})
        if not _type_ok(value, sub) and not (sub.get("type") == "number" and isinstance(value, int)):
            return f"parameter {name!r}: wrong type {type(value).__name__}"
        if not any(values_equal(value, v, sub) for v in values if not (v == "" and value != "")):
            return f"parameter {name!r}: {json.dumps(value)} not in {json.dumps(values)}"
    return None


def score_calls(calls: list[ToolCall], ground_truth: list[dict[str, Any]] | None, tools: list[ToolSpec]) -> str | None:
    """BFCL AST check of a whole reply: None when correct, else why not.

    ``ground_truth`` None or empty means an irrelevance case: correct iff no call.
    Several expected calls are matched in any order, each used once.
    """
    if not ground_truth:
        return None if not calls else f"called {calls[0].name!r} but no tool fits the question"
    if len(calls) != len(ground_truth):
        return f"{len(calls)} calls, expected {len(ground_truth)}"
    by_name = {t.name: t for t in tools}
    remaining = [next(iter(gt.items())) for gt in ground_truth]
    for call in calls:
        reasons = []
        for i, (name, accepted) in enumerate(remaining):
            reason = check_call(call, name, accepted, by_name.get(name))
            if reason is None:
                remaining.pop(i)
                break
            reasons.append(reason)
        else:
            return reasons[0] if reasons else "no matching expected call"
    return None


def validate_turn(text: str, plan: PromptPlan, tools: list[ToolSpec]) -> tuple[TurnOutput | None, str | None]:
    """(turn, None) when ``text`` is a well-formed turn with schema-valid arguments; else (turn or None, why)."""
    try:
        turn = parse_turn(text, plan)
    except ValueError as exc:
        return None, str(exc)
    by_name = {t.name: t for t in tools}
    for call in turn.tool_calls:
        try:
            jsonschema.validate(call.arguments, by_name[call.name].parameters)
        except jsonschema.ValidationError as exc:
            return turn, f"arguments of {call.name!r} invalid: {exc.message}"
    return turn, None


# ---------------------------------------------------------------- running


@dataclass
class CaseResult:
    id: str
    correct: bool
    valid: bool
    reason: str | None
    text: str
    seconds: float
    finish_reason: str = "stop"


@dataclass
class EvalReport:
    data: str
    constrained: bool
    results: list[CaseResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.results) / len(self.results) if self.results else 0.0

    @property
    def valid_rate(self) -> float:
        return sum(r.valid for r in self.results) / len(self.results) if self.results else 0.0

    def summary(self) -> dict[str, Any]:
        secs = [r.seconds for r in self.results]
        return {
            "data": self.data,
            "constraints": "on" if self.constrained else "off",
            "cases": len(self.results),
            "accuracy": round(self.accuracy, 4),
            "valid_call_rate": round(self.valid_rate, 4),
            # replies cut at max_tokens: the grammar can only vouch for finished outputs
            "cut_at_max_tokens": sum(r.finish_reason == "length" for r in self.results),
            "seconds_p50": round(statistics.median(secs), 3) if secs else 0.0,
            "seconds_total": round(sum(secs), 1),
        }


async def evaluate_case(
    llm: LLM, case: dict[str, Any], *, constrained: bool, params: GenerationParams, parallel: bool = False,
    tool_choice: str = "auto",
) -> CaseResult:
    """Ask the model one case and score its reply (``tool_choice`` "auto" lets it decline)."""
    tools = case_tools(case)
    plan = plan_turn(case_messages(case), tools, tool_choice, parallel_tool_calls=parallel)
    t0 = time.perf_counter()
    completion = await llm.complete(
        plan.chat_messages, json_schema=plan.json_schema if constrained else None, params=params
    )
    seconds = time.perf_counter() - t0
    turn, invalid = validate_turn(completion.text, plan, tools)
    calls = turn.tool_calls if turn is not None else []
    wrong = score_calls(calls, case.get("ground_truth"), tools)
    return CaseResult(
        id=case["id"], correct=wrong is None, valid=invalid is None,
        reason=invalid or wrong, text=completion.text, seconds=seconds, finish_reason=completion.finish_reason,
    )


async def evaluate(
    llm: LLM, cases: list[dict[str, Any]], *, constrained: bool, data: str = "",
    params: GenerationParams | None = None, parallel: bool = False, on_result: Any = None,
    tool_choice: str = "auto",
) -> EvalReport:
    """Run every case in order (one at a time: a steady per-case latency)."""
    params = params or GenerationParams(max_tokens=192)
    report = EvalReport(data=data, constrained=constrained)
    for case in cases:
        result = await evaluate_case(llm, case, constrained=constrained, params=params, parallel=parallel,
                                     tool_choice=tool_choice)
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="PATH",
                        help="a BFCL jsonl file, e.g. ../shared/data/bfcl/simple.jsonl (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases of each file")
    parser.add_argument("--no-constraints", action="store_true", help="only the unconstrained (free text) run")
    parser.add_argument("--constraints-only", action="store_true", help="only the grammar-constrained run")
    parser.add_argument("--model", default=None, metavar="PATH", help="default: the embedded SmolLM2-135M")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--tool-choice", default="auto", choices=["auto", "required"],
                        help="auto (default: the model may decline, as irrelevance needs) or required")
    parser.add_argument("--show-failures", type=int, default=0, metavar="N", help="print N failing cases per run")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    import anyio
    from rich.console import Console
    from rich.table import Table

    from agentrt.llm import LocalLLM

    console = Console(stderr=args.json)
    if args.no_constraints and args.constraints_only:
        console.print("[red]--no-constraints and --constraints-only exclude each other[/]")
        return 2
    modes = [False] if args.no_constraints else [True] if args.constraints_only else [True, False]
    datasets = []
    for path in args.data:
        try:
            datasets.append((path, load_cases(path, args.limit)))
        except (FileNotFoundError, ValueError) as exc:
            console.print(f"[red]agentrt eval bfcl: {exc}[/]")
            return 2
    with console.status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}..."):
        llm = LocalLLM(args.model)
    params = GenerationParams(max_tokens=args.max_tokens)
    reports: list[EvalReport] = []

    async def go() -> None:
        for path, cases in datasets:
            for constrained in modes:
                label = f"{Path(path).name} constraints {'on' if constrained else 'off'}"
                with console.status(label) as status:
                    done = [0]

                    def tick(_: CaseResult) -> None:
                        done[0] += 1
                        status.update(f"{label}: {done[0]}/{len(cases)}")
                        if not console.is_terminal and done[0] % 10 == 0:  # logs get progress too
                            console.print(f"{label}: {done[0]}/{len(cases)}", highlight=False)

                    reports.append(await evaluate(llm, cases, constrained=constrained, data=Path(path).name,
                                                  params=params, on_result=tick, tool_choice=args.tool_choice))

    try:
        anyio.run(go)
    finally:
        shutdown = getattr(getattr(llm, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
    if args.json:
        print(json.dumps([r.summary() for r in reports], indent=2))
        return 0
    table = Table(title=f"BFCL AST on {llm.model_name}")
    for col in ("data", "constraints", "cases", "accuracy", "valid calls", "cut", "p50 s/case", "total s"):
        table.add_column(col)
    for r in reports:
        s = r.summary()
        table.add_row(s["data"], s["constraints"], str(s["cases"]), f"{s['accuracy']:.1%}",
                      f"{s['valid_call_rate']:.1%}", str(s["cut_at_max_tokens"]), f"{s['seconds_p50']:.2f}",
                      f"{s['seconds_total']:.0f}")
    console.print(table)
    for r in reports:
        failures = [x for x in r.results if not x.correct][: args.show_failures]
        for f in failures:
            console.print(f"[dim]{r.data} {'on' if r.constrained else 'off'} {f.id}: {f.reason} :: {f.text[:160]}[/]",
                          highlight=False)
    return 0
