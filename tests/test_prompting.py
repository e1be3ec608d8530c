"""agentrt.prompting: per-turn schemas, transcript rendering (append-only), parsing turns."""
from __future__ import annotations

import json

import jsonschema
import pytest

from agentrt.prompting import PromptPlan, compact_json, parse_turn, plan_turn, tool_line
from agentrt.types import Message, ToolCall, ToolSpec

CALC = ToolSpec(
    name="calculator",
    description="Evaluate an arithmetic expression.\nMore details here.",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)
NOW = ToolSpec(
    name="now",
    description="Current date and time.",
    parameters={"type": "object", "properties": {"tz": {"type": "string", "default": "UTC"}}},
)
POINT_TOOL = ToolSpec(
    name="distance",
    description="Distance between points.",
    parameters={
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/Point"}, "b": {"$ref": "#/$defs/Point"}},
        "required": ["a", "b"],
        "$defs": {
            "Point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            }
        },
    },
)
USER = [Message(role="user", content="What is 2+2?")]


def valid(schema: dict, text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except jsonschema.ValidationError:
        return False


def test_no_tools_no_schema_is_free_text():
    plan = plan_turn(USER, [])
    assert plan.mode == "text" and plan.json_schema is None
    assert plan.chat_messages == [{"role": "user", "content": "What is 2+2?"}]
    out = parse_turn("four", plan)
    assert out.content == "four" and out.tool_calls == []


def test_output_schema_without_tools_is_the_object_itself():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    plan = plan_turn(USER, [], output_schema=schema)
    assert plan.mode == "schema" and plan.json_schema == schema
    assert "JSON" in plan.chat_messages[0]["content"]
    out = parse_turn('{"n":4}', plan)
    assert out.answer == {"n": 4} and out.tool_calls == []


def test_auto_allows_every_tool_call_and_the_answer():
    plan = plan_turn(USER, [CALC, NOW], parallel_tool_calls=False)
    s = plan.json_schema
    assert plan.mode == "tools"
    assert valid(s, '{"calls":[{"tool":"calculator","arguments":{"expression":"2+2"}}]}')
    assert valid(s, '{"calls":[{"tool":"now","arguments":{}}]}')
    assert valid(s, '{"answer":"4"}')
    assert not valid(s, '{"calls":[{"tool":"nope","arguments":{}}]}')
    assert not valid(s, '{"calls":[{"tool":"now","arguments":{"bogus":1}}]}')  # no invented keys
    assert not valid(s, '{"calls":[{"tool":"calculator","arguments":{}}]}')  # required arg
    two = '{"calls":[{"tool":"now","arguments":{}},{"tool":"now","arguments":{}}]}'
    assert not valid(s, two)  # maxItems 1 without parallel calls
    assert valid(plan_turn(USER, [CALC, NOW], parallel_tool_calls=True).json_schema, two)
    assert not valid(s, '{"calls":[]}')


def test_call_shape_puts_tool_before_arguments():
    plan = plan_turn(USER, [CALC])
    calls = plan.json_schema["anyOf"][0]["properties"]["calls"]["items"]
    assert list(calls["properties"]) == ["tool", "arguments"]
    assert calls["properties"]["tool"]["const"] == "calculator"


def test_required_and_named_choice_exclude_the_answer():
    req = plan_turn(USER, [CALC, NOW], tool_choice="required")
    assert not valid(req.json_schema, '{"answer":"4"}')
    assert valid(req.json_schema, '{"calls":[{"tool":"now","arguments":{}}]}')
    named = plan_turn(USER, [CALC, NOW], tool_choice="now")
    assert named.allowed_tools == ["now"]
    assert valid(named.json_schema, '{"calls":[{"tool":"now","arguments":{}}]}')
    assert not valid(named.json_schema, '{"calls":[{"tool":"calculator","arguments":{"expression":"1"}}]}')
    assert not valid(named.json_schema, '{"answer":"4"}')
    with pytest.raises(ValueError, match="answer"):
        parse_turn('{"answer":"4"}', named)
    with pytest.raises(ValueError, match="calculator"):
        parse_turn('{"calls":[{"tool":"calculator","arguments":{"expression":"1"}}]}', named)


def test_unknown_named_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="known tools: calculator, now"):
        plan_turn(USER, [CALC, NOW], tool_choice="weather")


def test_tool_choice_none_means_no_tools_offered():
    plan = plan_turn(USER, [CALC], tool_choice="none")
    assert plan.mode == "text" and plan.json_schema is None
    assert "calculator" not in json.dumps(plan.chat_messages)


def test_typed_answer_shape_uses_the_output_schema():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    plan = plan_turn(USER, [CALC], output_schema=schema)
    assert valid(plan.json_schema, '{"answer":{"n":4}}')
    assert not valid(plan.json_schema, '{"answer":"4"}')
    out = parse_turn('{"answer":{"n":4}}', plan)
    assert out.answer == {"n": 4} and out.content == '{"n":4}'


def test_defs_are_hoisted_and_prefixed_per_tool():
    other = ToolSpec(
        name="label",
        parameters={
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/Point"}},
            "required": ["p"],
            "$defs": {"Point": {"type": "string"}},  # same def name, different meaning
        },
    )
    plan = plan_turn(USER, [POINT_TOOL, other])
    s = plan.json_schema
    assert set(s["$defs"]) == {"distance__Point", "label__Point"}
    assert valid(s, '{"calls":[{"tool":"distance","arguments":{"a":{"x":1,"y":2},"b":{"x":0,"y":0}}}]}')
    assert valid(s, '{"calls":[{"tool":"label","arguments":{"p":"here"}}]}')
    assert not valid(s, '{"calls":[{"tool":"label","arguments":{"p":{"x":1,"y":2}}}]}')


def test_tool_arguments_are_closed_where_that_only_narrows():
    nested = ToolSpec(name="ship", parameters={
        "type": "object",
        "properties": {
            "to": {"type": "object", "properties": {"city": {"type": "string"}}},
            "items": {"type": "array", "items": {"anyOf": [{"properties": {"sku": {"type": "string"}}}, {"type": "null"}]}},
            "note": {"properties": {"a": {"type": "string"}}, "allOf": [{"properties": {"b": {"type": "string"}}}]},
            "one": {"oneOf": [{"properties": {"x": {"type": "integer"}}}, {"properties": {"y": {"type": "integer"}}}]},
        },
    })
    plan = plan_turn(USER, [nested])
    args = plan.json_schema["anyOf"][0]["properties"]["calls"]["items"]["properties"]["arguments"]
    props = args["properties"]
    assert args["additionalProperties"] is False and props["to"]["additionalProperties"] is False
    assert props["items"]["items"]["anyOf"][0]["additionalProperties"] is False
    # beside allOf the members may add keys, and under oneOf closing a branch would admit values
    # that match both branches of the original (invalid there): both stay as written
    assert "additionalProperties" not in props["note"] and "additionalProperties" not in props["note"]["allOf"][0]
    assert all("additionalProperties" not in b for b in props["one"]["oneOf"])
    assert nested.parameters["properties"]["to"] == {"type": "object", "properties": {"city": {"type": "string"}}}
    assert not valid(plan.json_schema, '{"calls":[{"tool":"ship","arguments":{"to":{"city":"Oslo","zip":"1"}}}]}')
    assert valid(plan.json_schema, '{"calls":[{"tool":"ship","arguments":{"note":{"a":"x","b":"y"}}}]}')


def test_system_prompt_lists_tools_compactly():
    line = tool_line(CALC)
    assert line == "- calculator(expression: string): Evaluate an arithmetic expression."
    assert tool_line(NOW) == "- now(tz?: string): Current date and time."
    plan = plan_turn([Message(role="system", content="Be brief."), *USER], [CALC, NOW])
    system = plan.chat_messages[0]
    assert system["role"] == "system"
    assert '{"calls":[{"tool":"<name>","arguments":{...}}]}' in system["content"]
    assert system["content"].endswith("Be brief.")
    assert [m["role"] for m in plan.chat_messages] == ["system", "user"]


def test_parse_calls_and_answer_in_tools_mode():
    plan = plan_turn(USER, [CALC, NOW])
    out = parse_turn('{"calls":[{"tool":"calculator","arguments":{"expression":"2+2"}},{"tool":"now","arguments":{}}]}', plan)
    assert [c.name for c in out.tool_calls] == ["calculator", "now"]
    assert out.tool_calls[0].arguments == {"expression": "2+2"}
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in out.tool_calls)
    assert out.tool_calls[0].id != out.tool_calls[1].id
    ans = parse_turn('{"answer":"It is 4."}', plan)
    assert ans.content == "It is 4." and ans.answer == "It is 4." and ans.tool_calls == []


def test_parse_free_text_variants_for_unconstrained_runs():
    plan = plan_turn(USER, [CALC])
    fenced = '```json\n{"calls":[{"tool":"calculator","arguments":{"expression":"1"}}]}\n```'
    assert parse_turn(fenced, plan).tool_calls[0].name == "calculator"
    chatty = 'Sure! {"tool": "calculator", "arguments": {"expression": "1"}} done'
    assert parse_turn(chatty, plan).tool_calls[0].arguments == {"expression": "1"}
    openai = '{"name":"calculator","arguments":"{\\"expression\\":\\"3\\"}"}'
    assert parse_turn(openai, plan).tool_calls[0].arguments == {"expression": "3"}


@pytest.mark.parametrize(
    "text, match",
    [
        ("not json at all", "not valid JSON"),
        ('{"calls":[]}', "non-empty"),
        ('{"calls":[{"tool":"rm","arguments":{}}]}', "unknown tool 'rm'"),
        ('{"calls":[{"tool":"calculator","arguments":[1]}]}', "must be a JSON object"),
        ('{"something":1}', "must be"),
    ],
)
def test_parse_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_turn(text, plan_turn(USER, [CALC]))


def test_parallel_off_rejects_several_calls():
    plan = plan_turn(USER, [NOW], parallel_tool_calls=False)
    with pytest.raises(ValueError, match="only one call"):
        parse_turn('{"calls":[{"tool":"now","arguments":{}},{"tool":"now","arguments":{}}]}', plan)


def _step_transcript(raw: str) -> list[Message]:
    call = ToolCall(id="call_1", name="calculator", arguments={"expression": "2.50*2"})
    return [
        *USER,
        Message(role="assistant", content=raw, tool_calls=[call]),
        Message(role="tool", tool_call_id="call_1", name="calculator", content="5.0"),
    ]


def test_rendering_is_append_only_and_keeps_raw_model_text():
    # The model spelled a number "2.50": re-serialising would give 2.5 and break the prefix.
    raw = '{"calls":[{"tool":"calculator","arguments":{"expression":"2.50*2"}}]}'
    step1 = plan_turn(USER, [CALC, NOW])
    step2 = plan_turn(_step_transcript(raw), [CALC, NOW])
    n = len(step1.chat_messages)
    assert step2.chat_messages[:n] == step1.chat_messages
    assert step2.chat_messages[n] == {"role": "assistant", "content": raw}
    assert step2.chat_messages[n + 1] == {"role": "user", "content": "Result of calculator: 5.0"}
    # the same transcript with another tool_choice renders identically (only the grammar differs)
    step2_req = plan_turn(_step_transcript(raw), [CALC, NOW], tool_choice="required")
    assert step2_req.chat_messages == step2.chat_messages


def test_tool_results_of_one_step_form_one_user_message():
    calls = [ToolCall(id="a", name="calculator", arguments={"expression": "1"}), ToolCall(id="b", name="now")]
    msgs = [
        *USER,
        Message(role="assistant", tool_calls=calls),  # e.g. from an OpenAI client: no raw text
        Message(role="tool", tool_call_id="a", content="1"),
        Message(role="tool", tool_call_id="b", content="boom", is_error=True),
        Message(role="user", content="and now?"),
    ]
    chat = plan_turn(msgs, [CALC, NOW]).chat_messages
    assert chat[2]["content"] == compact_json(
        {"calls": [{"tool": "calculator", "arguments": {"expression": "1"}}, {"tool": "now", "arguments": {}}]}
    )
    assert chat[3] == {"role": "user", "content": "Result of calculator: 1\nError from now: boom"}
    assert chat[4] == {"role": "user", "content": "and now?"}


def test_plain_assistant_answers_render_as_answer_json_in_tools_mode():
    msgs = [*USER, Message(role="assistant", content="4"), Message(role="user", content="thanks")]
    chat = plan_turn(msgs, [CALC]).chat_messages
    assert chat[2] == {"role": "assistant", "content": '{"answer":"4"}'}
    assert plan_turn(msgs, []).chat_messages[1] == {"role": "assistant", "content": "4"}


def test_duplicate_tool_names_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        plan_turn(USER, [CALC, CALC])


def test_prompt_plan_is_json_serialisable():
    plan = plan_turn(USER, [CALC])
    assert PromptPlan.model_validate_json(plan.model_dump_json()) == plan


def test_answer_choice_keeps_the_tool_prompt_but_allows_only_the_answer():
    plan = plan_turn(USER, [CALC, NOW], tool_choice="answer")
    assert plan.mode == "tools" and plan.allowed_tools == []
    assert plan.chat_messages == plan_turn(USER, [CALC, NOW]).chat_messages
    assert valid(plan.json_schema, '{"answer":"4"}')
    assert not valid(plan.json_schema, '{"calls":[{"tool":"now","arguments":{}}]}')
    with pytest.raises(ValueError, match="final answer is required"):
        parse_turn('{"calls":[{"tool":"now","arguments":{}}]}', plan)
    assert parse_turn('{"answer":"4"}', plan).content == "4"


def test_a_tool_named_like_a_choice_is_a_named_choice():
    answer_tool = ToolSpec(name="answer", parameters={"type": "object", "properties": {}})
    plan = plan_turn(USER, [CALC, answer_tool], tool_choice="answer")
    assert plan.allowed_tools == ["answer"] and not plan.allow_answer
    with pytest.raises(ValueError, match="tool call is required"):
        parse_turn('{"answer":"4"}', plan)


def test_string_formats_show_in_the_tool_line():
    spec = ToolSpec(name="weekday", description="Day of the week.", parameters={
        "type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]})
    assert tool_line(spec) == "- weekday(date: date): Day of the week."


def test_named_choice_is_exactly_one_call():
    plan = plan_turn(USER, [CALC, NOW], tool_choice="now", parallel_tool_calls=True)
    assert plan.json_schema["properties"]["calls"]["maxItems"] == 1
    assert "maxItems" not in plan_turn(USER, [CALC, NOW], tool_choice="required").json_schema["properties"]["calls"]
