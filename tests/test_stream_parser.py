"""The streaming parser of the fixed output format, fed in every possible split."""
from __future__ import annotations

import json

import pytest

from agentrt.stream_parser import ContentDelta, ToolCallArgsDelta, ToolCallStart, ToolCallStreamParser


def run(text: str, chunk: int, mode: str = "tools"):
    p = ToolCallStreamParser(mode)
    events = []
    for i in range(0, len(text), chunk):
        events += p.feed(text[i : i + chunk])
    events += p.finish()
    return p, events


def assemble(events):
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index not in calls, "a call started twice"
            calls[e.index] = {"id": e.id, "name": e.name, "args": ""}
        elif isinstance(e, ToolCallArgsDelta):
            assert e.index in calls, "arguments before the call started"
            calls[e.index]["args"] += e.json_fragment
    return content, [calls[i] for i in sorted(calls)]


TWO_CALLS = {"calls": [
    {"tool": "get_weather", "arguments": {"city": "Paris \"FR\"", "days": 3, "units": ["c", None, True, -1.5e3]}},
    {"tool": "add", "arguments": {"a": 1, "b": {"x": []}}},
]}


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 1000])
def test_tool_calls_reassemble_in_any_split(chunk):
    text = json.dumps(TWO_CALLS, separators=(",", ":"))
    p, events = run(text, chunk)
    content, calls = assemble(events)
    assert content == ""
    assert [c["name"] for c in calls] == ["get_weather", "add"]
    for c, want in zip(calls, TWO_CALLS["calls"]):
        assert json.loads(c["args"]) == want["arguments"]
        assert c["id"].startswith("call_")
    assert [(c.name, c.arguments) for c in p.tool_calls] == [(w["tool"], w["arguments"]) for w in TWO_CALLS["calls"]]
    assert p.done


def test_args_stream_before_they_are_complete():
    p = ToolCallStreamParser()
    ev = p.feed('{"calls":[{"tool":"f","arguments":{"q":"hel')
    assert ev[0] == ToolCallStart(index=0, id=ev[0].id, name="f")
    assert "".join(e.json_fragment for e in ev[1:]) == '{"q":"hel'
    # a number is held back until it is known to be complete
    ev = p.feed('lo","n":12')
    assert "".join(e.json_fragment for e in ev) == 'lo","n":'
    ev = p.feed("3}}]}")
    assert "".join(e.json_fragment for e in ev) == "123}"
    assert p.finish() == []


@pytest.mark.parametrize("chunk", [1, 2, 4, 1000])
def test_answer_string_is_unescaped(chunk):
    answer = 'Line 1\nLine "2" \\ tab\t é 😀 done'
    text = json.dumps({"answer": answer}, ensure_ascii=True, separators=(",", ":"))
    assert "\\ud83d\\ude00" in text  # a surrogate pair, split across chunks at chunk=1
    p, events = run(text, chunk)
    content, calls = assemble(events)
    assert content == answer and calls == []
    assert p.content == answer


def test_structured_answer_is_its_json_text():
    value = {"name": "Ada", "age": 36, "tags": ["x"]}
    text = json.dumps({"answer": value}, separators=(",", ":"))
    _, events = run(text, 3)
    content, _ = assemble(events)
    assert json.loads(content) == value


def test_whitespace_and_key_order_tolerated():
    text = '{ "calls" : [ { "arguments" : {"a": 1} , "tool" : "f" } ] }'
    p, events = run(text, 2)
    _, calls = assemble(events)
    assert calls[0]["name"] == "f" and json.loads(calls[0]["args"]) == {"a": 1}


def test_missing_arguments_means_empty_object():
    _, events = run('{"calls":[{"tool":"now"}]}', 4)
    _, calls = assemble(events)
    assert calls == [{"id": calls[0]["id"], "name": "now", "args": "{}"}]


def test_truncated_output_is_reported():
    p = ToolCallStreamParser()
    p.feed('{"calls":[{"tool":"f","arguments":{"a":')
    with pytest.raises(ValueError, match="truncated"):
        p.finish()


@pytest.mark.parametrize("bad", ['hello', '{"calls":[1]}', '{"answer":"x"}}', '{"a" 1}', '{"answer":tru,}', '{"calls":[{"arguments":{}}]}'])
def test_malformed_output_raises(bad):
    p = ToolCallStreamParser()
    with pytest.raises(ValueError):
        p.feed(bad)
        p.finish()


@pytest.mark.parametrize("mode", ["text", "schema"])
def test_text_and_schema_modes_pass_through(mode):
    p, events = run('{"not": "parsed"', 3, mode)
    assert "".join(e.text for e in events) == '{"not": "parsed"'
    assert all(isinstance(e, ContentDelta) for e in events)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        ToolCallStreamParser("json")
