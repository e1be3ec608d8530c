"""`agentrt run` on a scripted model: step printing, --json events, --tools loading, exit codes."""
from __future__ import annotations

import json

import pytest

import agentrt.llm
from agentrt.cli import main as cli_main
from agentrt.commands.run import load_tools
from agentrt.testing import ScriptedLLM


@pytest.fixture
def scripted(monkeypatch):
    made: list[tuple] = []

    def install(replies):
        def factory(model=None, **overrides):
            made.append((model, overrides))
            return ScriptedLLM(replies)

        monkeypatch.setattr(agentrt.llm, "LocalLLM", factory)
        return made

    return install


def test_run_prints_each_step(scripted, capsys):
    made = scripted([{"calls": [{"tool": "add", "arguments": {"a": 2, "b": 40}}]}, {"answer": "42"}])
    code = cli_main(["run", "What is 2+40?", "--tools", "tests.helpers.planner:registry", "--no-prefix-cache"])
    out = capsys.readouterr().out
    assert code == 0
    assert made == [(None, {"enable_prefix_caching": False})]
    assert 'call add({"a": 2, "b": 40})' in out
    assert "result 42" in out
    assert "step 2: ttft" in out and "answer: 42" in out


def test_run_json_emits_one_event_per_line(scripted, capsys):
    scripted([{"calls": [{"tool": "shout", "arguments": {"text": "hi"}}]}, {"answer": "HI"}])
    code = cli_main(["run", "shout hi", "--tools", "tests.helpers.planner:shout", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    events = [json.loads(line) for line in lines]
    assert code == 0
    assert events[0]["type"] == "step_started" and events[-1]["type"] == "run_finished"
    assert events[-1]["result"]["answer"] == "HI"
    assert any(e["type"] == "tool_result" and e["result"]["content"] == "HI" for e in events)


def test_run_exit_code_when_not_completed(scripted, capsys):
    scripted([{"calls": [{"tool": "add", "arguments": {"a": 1, "b": 1}}]}] * 2)
    code = cli_main(["run", "loop", "--tools", "tests.helpers.planner:registry", "--max-steps", "2"])
    assert code == 1
    assert "max_steps" in capsys.readouterr().out


def test_bad_tool_choice_is_reported(scripted, capsys):
    scripted([])
    assert cli_main(["run", "q", "--tools", "tests.helpers.planner:registry", "--tool-choice", "nope"]) == 2
    assert "known tools: add, shout" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, match",
    [("no_colon", "MODULE:ATTR"), ("tests.helpers.planner:missing", "cannot load"), ("tests.helpers.planner:not_a_tool", "not a registry")],
)
def test_load_tools_errors(spec, match):
    with pytest.raises(SystemExit, match=match):
        load_tools([spec])


def test_load_tools_merges_specs():
    reg = load_tools(["tests.helpers.planner:add", "tests.helpers.planner:shout"])
    assert reg.names == ["add", "shout"]
