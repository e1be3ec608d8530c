"""`bench agent` machinery on a scripted model: the task suite, schedules, summaries."""
from __future__ import annotations

import pytest

from agentrt.benchmarks.agent_suite import TASKS, make_workspace, run_side_by_side, summarize
from agentrt.llm import GenerationParams
from agentrt.testing import ScriptedLLM
from agentrt.tools import builtin_registry

ARGS = {
    "calculate": {"expression": "6*7"},
    "current_time": {"timezone": "UTC"},
    "add_to_date": {"date": "2025-01-01", "days": 3},
    "date_difference": {"start": "2025-01-01", "end": "2025-02-01"},
    "weekday": {"date": "2025-01-01"},
    "convert_time": {"time": "2025-01-01T12:00:00", "to_timezone": "Asia/Tokyo"},
    "convert_units": {"value": 10, "from_unit": "km", "to_unit": "mi"},
    "read_file": {"path": "notes.txt"},
    "list_files": {},
    "query_data": {"source": "sales.csv", "aggregate": "sum", "field": "amount"},
}


def schema_following_reply(messages, schema):
    """Call the one tool the step's schema allows, or answer when only the answer is allowed."""
    calls = (schema.get("properties") or {}).get("calls")
    if calls is None:
        return '{"answer":"done"}'
    name = calls["items"]["properties"]["tool"]["const"]
    import json

    return json.dumps({"calls": [{"tool": name, "arguments": ARGS[name]}]}, separators=(",", ":"))


def test_suite_has_20_tasks_of_3_calls_on_builtin_tools():
    names = set(builtin_registry().names)
    assert len(TASKS) >= 20 and len({t.name for t in TASKS}) == len(TASKS)
    for task in TASKS:
        assert len(task.plan) >= 3 and set(task.plan) <= names, task.name
        assert task.tool_choice(len(task.plan) + 1) == "answer"


async def test_side_by_side_runs_every_task_with_its_schedule():
    tools = builtin_registry(make_workspace())
    engines = {"a": ScriptedLLM([schema_following_reply] * 400), "b": ScriptedLLM([schema_following_reply] * 400)}
    seen = []
    summaries = await run_side_by_side(engines, list(TASKS), tools, GenerationParams(max_tokens=32),
                                       on_run=lambda n, t, r: seen.append((n, t.name, r.status)))
    assert len(seen) == 2 * len(TASKS) and all(status == "completed" for _, _, status in seen)
    a = summaries["a"]
    assert a["runs"] == len(TASKS) and a["completed"] == len(TASKS)
    assert a["steps"] == sum(len(t.plan) + 1 for t in TASKS)
    assert a["tool_calls"] == sum(len(t.plan) for t in TASKS)
    assert a["tool_errors"] == 0, "every canned call must succeed on the bench workspace"
    assert a["cached_share_step2plus"] > 0.9  # ScriptedLLM models an append-only prefix cache


def test_summarize_percentiles_and_shares():
    from agentrt.types import RunResult, Step

    runs = [RunResult(run_id="r", status="completed", steps=[
        Step(index=1, ttft_s=1.0, prompt_tokens=100, completion_tokens=10),
        Step(index=2, ttft_s=0.1, prompt_tokens=120, cached_tokens=110, completion_tokens=8),
        Step(index=3, ttft_s=0.3, prompt_tokens=140, cached_tokens=125),
    ])]
    s = summarize(runs, 2.0)
    assert s["ttft_step1_p50_ms"] == pytest.approx(1000)
    assert s["ttft_step2plus_p95_ms"] == pytest.approx(300)
    assert s["cached_share_step2plus"] == pytest.approx(235 / 260)
    # step 2 got all 110 tokens of step 1; step 3 missed 3 of step 2's 128
    assert s["prev_step_tokens_missed_max"] == 3 and s["prev_step_tokens_missed_p50"] in (0, 3)
    assert (s["append_only_steps_ok"], s["append_only_steps"]) == (1, 2)  # only step 2 meets the criterion
    assert s["new_tokens_per_step_mean"] == pytest.approx((10 + 12) / 2)
    assert s["total_s"] == 2.0


async def test_peer_phases_one_at_a_time_and_at_once_with_the_verdict():
    from agentrt.benchmarks import agent_peer

    tools = builtin_registry(make_workspace())
    tasks = list(TASKS[:4])
    engines = {"agentrt": ScriptedLLM([schema_following_reply] * 100),
               "llama.cpp": ScriptedLLM([schema_following_reply] * 100)}
    one = await run_side_by_side(engines, tasks, tools, GenerationParams(max_tokens=32), summary=agent_peer._side)
    many = await agent_peer._at_once(engines, tasks, tools, GenerationParams(max_tokens=32), concurrency=3)
    for phase in (one, many):
        for side in phase.values():
            assert side["completed"] == len(tasks) and side["invalid_calls"] == 0
            assert side["tool_calls"] == sum(len(t.plan) for t in tasks) and side["statuses"] == {"completed": 4}
            assert side["run_errors"] == []
    failing = {"llama.cpp": ScriptedLLM([])}  # no replies: the run ends in error, and the report says why
    broken = await run_side_by_side(failing, tasks[:1], tools, GenerationParams(max_tokens=32), summary=agent_peer._side)
    assert broken["llama.cpp"]["statuses"] == {"error": 1} and len(broken["llama.cpp"]["run_errors"]) == 1
    one["agentrt"]["total_s"], one["llama.cpp"]["total_s"] = 1.0, 4.0
    many["agentrt"]["total_s"], many["llama.cpp"]["total_s"] = 1.0, 3.0
    one["agentrt"]["invalid_calls"] = 1
    v = agent_peer._verdict({"one_at_a_time": one, "at_once": many})
    assert v["wall_time_ratio"] == 0.25 and v["wall_time_ratio_target_0.35"]
    assert v["wall_time_ratio_concurrent"] == pytest.approx(1 / 3) and not v["wall_time_ratio_concurrent_target_0.25"]
    assert v["invalid_calls"] == {"agentrt": 1, "llama.cpp": 0} and not v["ours_no_invalid_calls"]


def test_peer_without_llama_cpp_server_is_a_clear_refusal(monkeypatch, capsys):
    import sys

    from agentrt.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp.server", None)  # as if the [server] extra were missing
    assert main(["bench", "agent", "--peer", "llamacpp", "--quick"]) == 2
    assert "pip install 'llama-cpp-python[server]'" in capsys.readouterr().out
