"""A compile is first tried in the caller's process under tight limits (engine/grammar/quick.py); past
any of them it goes to a compile worker, and what the attempt finishes is what the worker gives."""
from __future__ import annotations

import functools
import json
import pickle

import numpy as np
import pytest

from agentrt.engine.grammar import GrammarCompiler, UnsupportedSchemaError, automaton, quick
from agentrt.engine.grammar.byte_dfa import regex_to_dfa
from agentrt.engine.grammar.compile_job import compile_schema
from tests.helpers.grammar import smollm2_tokenizer

ONE_OF = {"oneOf": [{"type": "string", "pattern": "^a+$"}, {"type": "string", "pattern": "^b+$"}]}
TOOL = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "unit": {"enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city"], "additionalProperties": False}
# 2**15 states: past the attempt's 20,000, well within a worker's 400,000
WIDE = {"type": "string", "pattern": "^[ab]*a[ab]{14}$"}


@pytest.fixture
def worker_calls(monkeypatch):
    """The jobs sent to a compile worker during the test."""
    calls = []
    run = automaton.workers.run

    def counted(work, memory_bytes, deadline):
        calls.append(work)
        return run(work, memory_bytes, deadline)

    monkeypatch.setattr(automaton.workers, "run", counted)
    return calls


@pytest.fixture
def compiler(tmp_path, monkeypatch):
    # a generous time, so a busy machine cannot send these to a worker: what is tested is where the
    # limits of states and size put a schema, and that the attempt's outcome is the worker's
    monkeypatch.setenv("AGENTRT_GRAMMAR_IN_PROCESS_MS", "5000")
    tok = smollm2_tokenizer()
    return GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=str(tmp_path))


def _same(a, b) -> bool:
    return a.initial == b.initial and np.array_equal(a.table, b.table) and np.array_equal(a.final, b.final)


@pytest.mark.parametrize("schema", [TOOL, ONE_OF], ids=["tool", "oneOf"])
def test_a_small_schema_compiles_in_process_to_what_a_worker_builds(schema, compiler, worker_calls):
    grammar = compiler.compile_json_schema(schema, timeout_s=30)
    assert worker_calls == []  # the oneOf's disjointness proof too ran in the attempt
    regex, unenforced, dfa = pickle.loads(automaton.run_bounded(
        functools.partial(compile_schema, schema, False, 30), 30))  # no quick_s: in a worker
    assert len(worker_calls) == 1
    assert (regex, unenforced) == (grammar.regex, grammar.unenforced) and _same(dfa, grammar.dfa)
    assert grammar.accepts_tokens(compiler._encode(json.dumps(
        {"city": "Oslo", "days": 3} if schema is TOOL else "aaa", separators=(",", ":"))))


def test_a_schema_past_the_attempts_limits_compiles_in_a_worker(compiler, worker_calls):
    grammar = compiler.compile_json_schema(WIDE, timeout_s=30)
    assert len(worker_calls) == 1
    assert grammar.dfa.dead > quick.QuickLimits(0).max_states
    assert grammar.accepts_tokens(compiler._encode('"' + "b" * 3 + "a" + "ab" * 7 + '"'))


def test_an_unsupported_keyword_is_refused_by_the_attempt_itself(compiler, worker_calls):
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.compile_json_schema({"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                                     timeout_s=30)
    assert "uniqueItems" in str(e.value) and worker_calls == []


def test_without_the_attempt_every_compile_goes_to_a_worker(monkeypatch, tmp_path, worker_calls):
    monkeypatch.setenv("AGENTRT_GRAMMAR_IN_PROCESS_MS", "0")
    tok = smollm2_tokenizer()
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=str(tmp_path))
    comp.compile_json_schema(TOOL, timeout_s=30)
    assert len(worker_calls) == 1
    monkeypatch.setenv("AGENTRT_GRAMMAR_IN_PROCESS_MS", "soon")
    with pytest.raises(ValueError, match="AGENTRT_GRAMMAR_IN_PROCESS_MS"):
        GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=str(tmp_path))


def test_the_dfa_builder_stops_at_the_attempts_limits_not_with_a_verdict():
    with quick.attempt(5.0):  # time enough: the state limit stops it
        with pytest.raises(quick.QuickLimitExceeded, match="20000 states"):
            regex_to_dfa('"[ab]*a[ab]{14}"')
    with quick.attempt(1e-4):  # 2**13 states are within the limit: building them passes the time
        with pytest.raises(quick.QuickLimitExceeded, match="automaton passed its time limit"):
            regex_to_dfa('"[ab]*a[ab]{12}"')
    with quick.attempt(1e-4):  # a million NFA states are spelled out before a DFA state is built
        with pytest.raises(quick.QuickLimitExceeded, match="NFA passed its time limit"):
            regex_to_dfa('"((a{100}){100}){100}"')
    assert regex_to_dfa('"[ab]*a[ab]{14}"').dead > 2 ** 15  # outside an attempt: the real limits


def test_unicode_categories_are_kept_on_disk_and_read_back_alike(monkeypatch, tmp_path):
    from agentrt.engine.grammar import regex_util

    monkeypatch.setenv("AGENTRT_CACHE_DIR", str(tmp_path))
    regex_util._categories.cache_clear()
    try:
        computed = regex_util._categories()
        assert list((tmp_path / "unicode").iterdir())
        regex_util._categories.cache_clear()
        assert regex_util._categories() == computed
        assert computed["digit"][0] == [(0x30, 0x39)] and (0x660, 0x669) in computed["digit"][1]  # Arabic-Indic
    finally:
        regex_util._categories.cache_clear()
