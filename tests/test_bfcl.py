"""The BFCL AST scorer on hand-made cases, and the eval loop on a scripted LLM."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentrt.benchmarks.bfcl import (
    case_tools,
    evaluate,
    load_cases,
    normalize_string,
    score_calls,
    validate_turn,
    values_equal,
)
from agentrt.prompting import plan_turn
from agentrt.testing import ScriptedLLM
from agentrt.types import Message, ToolCall, ToolSpec

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bfcl"

AREA = ToolSpec(
    name="calculate_triangle_area",
    parameters={
        "type": "object",
        "properties": {
            "base": {"type": "integer"},
            "height": {"type": "number"},
            "unit": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "opts": {"type": "object", "properties": {"school": {"type": "string"}}},
            "exact": {"type": "boolean"},
        },
        "required": ["base", "height"],
    },
)
GT = [{"calculate_triangle_area": {"base": [10], "height": [5.0], "unit": ["units", ""]}}]


def call(name="calculate_triangle_area", **args) -> ToolCall:
    return ToolCall(id="call_x", name=name, arguments=args)


def test_normalize_string_follows_bfcl():
    assert normalize_string("New York, NY") == "newyorkny"
    assert normalize_string("a-b_c*d^e/f.g") == "abcdefg"
    assert normalize_string("it's") == 'it"s'


def test_correct_call_with_int_for_float_and_optional_omitted():
    assert score_calls([call(base=10, height=5)], GT, [AREA]) is None
    assert score_calls([call(base=10, height=5.0, unit="Units")], GT, [AREA]) is None


@pytest.mark.parametrize(
    "calls, reason",
    [
        ([call(base=10)], "missing required parameter 'height'"),
        ([call(base=11, height=5)], "parameter 'base'"),
        ([call(base=10.0, height=5)], "wrong type"),  # a float is not accepted for an int
        ([call(base=10, height=5, colour="red")], "unknown parameter 'colour'"),
        ([call(base=10, height=5, unit="meters")], "parameter 'unit'"),
        ([call(name="area", base=10, height=5)], "wrong function"),
        ([], "0 calls, expected 1"),
        ([call(base=10, height=5), call(base=10, height=5)], "2 calls"),
    ],
)
def test_wrong_calls_say_why(calls, reason):
    got = score_calls(calls, GT, [AREA])
    assert got is not None and reason in got


def test_parameter_without_empty_option_cannot_be_omitted():
    gt = [{"calculate_triangle_area": {"base": [10], "height": [5.0], "unit": ["units"]}}]
    assert "missing parameter 'unit'" in score_calls([call(base=10, height=5)], gt, [AREA])


def test_lists_dicts_and_booleans():
    gt = [{"calculate_triangle_area": {
        "base": [10], "height": [1.0],
        "tags": [["New York", "LA"]],
        "opts": [{"school": ["Bluebird High School", "Bluebird HS"]}],
        "exact": [True, ""],
    }}]
    ok = call(base=10, height=1, tags=["new york", "la"], opts={"school": "bluebird hs"}, exact=True)
    assert score_calls([ok], gt, [AREA]) is None
    assert score_calls([call(base=10, height=1, tags=["LA", "New York"], opts={"school": "x"})], gt, [AREA])
    assert score_calls([call(base=10, height=1, tags=["New York", "LA"], opts={"school": "Bluebird HS"}, exact=1)],
                       gt, [AREA])
    assert not values_equal(1, True) and not values_equal(True, 1)
    assert values_equal([1, 2], [1.0, 2.0], {"type": "array", "items": {"type": "number"}})


def test_irrelevance_is_correct_only_without_calls():
    assert score_calls([], None, [AREA]) is None
    assert "no tool fits" in score_calls([call(base=1, height=1)], None, [AREA])


def test_several_expected_calls_match_in_any_order():
    gt = [{"calculate_triangle_area": {"base": [1], "height": [1.0]}},
          {"calculate_triangle_area": {"base": [2], "height": [2.0]}}]
    assert score_calls([call(base=2, height=2), call(base=1, height=1)], gt, [AREA]) is None
    assert score_calls([call(base=2, height=2), call(base=2, height=2)], gt, [AREA]) is not None


def test_validate_turn_checks_arguments_against_the_schema():
    plan = plan_turn([Message(role="user", content="q")], [AREA])
    turn, why = validate_turn('{"calls":[{"tool":"calculate_triangle_area","arguments":{"base":1,"height":2}}]}', plan, [AREA])
    assert why is None and turn.tool_calls[0].arguments == {"base": 1, "height": 2}
    _, why = validate_turn('{"calls":[{"tool":"calculate_triangle_area","arguments":{"base":"1","height":2}}]}', plan, [AREA])
    assert "invalid" in why
    _, why = validate_turn("I think the area is 25", plan, [AREA])
    assert "not valid JSON" in why


CASES = [
    {"id": "a", "question": [[{"role": "user", "content": "Area of base 10 height 5?"}]],
     "tools_openai": [{"type": "function", "function": AREA.model_dump()}], "ground_truth": GT},
    {"id": "b", "question": [[{"role": "user", "content": "Capital of France?"}]],
     "tools_openai": [{"type": "function", "function": AREA.model_dump()}], "ground_truth": None},
]


async def test_evaluate_scores_constrained_and_free_text_runs():
    good = {"calls": [{"tool": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}]}
    llm = ScriptedLLM([good, {"answer": "Paris"}])
    report = await evaluate(llm, CASES, constrained=True, data="x")
    assert report.accuracy == 1.0 and report.valid_rate == 1.0
    assert llm.calls[0][1] is not None  # a schema was sent
    free = ScriptedLLM(['Sure: {"tool":"calculate_triangle_area","arguments":{"base":10,"height":6}}', "Paris."])
    report = await evaluate(free, CASES, constrained=False, data="x")
    assert free.calls[0][1] is None
    assert [r.correct for r in report.results] == [False, True]  # wrong height; no call is right
    assert [r.valid for r in report.results] == [True, False]
    assert report.summary()["accuracy"] == 0.5


def test_load_cases_errors_and_real_data():
    with pytest.raises(FileNotFoundError, match="BFCL data not found"):
        load_cases("/nonexistent/simple.jsonl")
    if not (DATA / "simple.jsonl").is_file():
        pytest.skip(f"shared BFCL data absent at {DATA}")
    cases = load_cases(DATA / "simple.jsonl", limit=50)
    assert len(cases) == 50
    # every ground truth, turned into a call with its first accepted values, scores correct
    for case in cases:
        tools = case_tools(case)
        calls = []
        for gt in case["ground_truth"]:
            name, params = next(iter(gt.items()))
            args = {k: v[0] for k, v in params.items() if v[0] != ""}
            calls.append(ToolCall(id="c", name=name, arguments=args))
        assert score_calls(calls, case["ground_truth"], tools) is None, (case["id"], json.dumps(calls[0].arguments))


async def test_required_tool_choice_sends_calls_only_and_counts_cuts():
    llm = ScriptedLLM([{"calls": [{"tool": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}]}])
    report = await evaluate(llm, CASES[:1], constrained=True, tool_choice="required")
    assert "anyOf" not in llm.calls[0][1] and report.accuracy == 1.0
    assert report.summary()["cut_at_max_tokens"] == 0
