"""Engine and grammar input errors (schema keywords, context window) become 400s."""
from __future__ import annotations

from fastapi.testclient import TestClient

from agentrt.server import create_app
from tests.helpers.server import raising_llm
from tests.test_server import USER, assert_error, make_registry


def client(llm) -> TestClient:
    return TestClient(create_app(llm=llm, registry=make_registry()))


def test_engine_input_errors_become_400():
    from agentrt.engine import ContextOverflowError
    from agentrt.engine.grammar.errors import BudgetError
    from agentrt.engine.grammar.errors import UnsupportedSchemaError

    exc = UnsupportedSchemaError(["patternProperties at /properties/x"])
    with client(raising_llm(exc)) as c:
        for stream in (False, True):
            err = assert_error(c.post("/v1/chat/completions", json={"messages": USER, "stream": stream,
                                                                    "response_format": {"type": "json_object"}}), 400)
            assert err["code"] == "unsupported_schema" and "patternProperties" in err["message"]
    with client(raising_llm(BudgetError("max_tokens=2 is below the 7 tokens the schema needs"))) as c:
        err = assert_error(c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2,
                                                                "response_format": {"type": "json_object"}}), 400)
        assert err["param"] == "max_tokens" and "below the 7 tokens" in err["message"]
    with client(raising_llm(ContextOverflowError("prompt of 9000 tokens over 8192"))) as c:
        err = assert_error(c.post("/v1/chat/completions", json={"messages": USER}), 400)
        assert err["code"] == "context_length_exceeded"
        assert c.app.state.agentrt.queue.running == 0  # the slot was given back


def test_output_schema_compiles_under_a_slot_and_a_refusal_gives_it_back():
    from agentrt.engine.grammar.errors import UnsupportedSchemaError
    from agentrt.testing import ScriptedLLM

    class Compiling(ScriptedLLM):
        def prepare_schema(self, schema):
            seen.append(app.state.agentrt.queue.running)  # a compile can take seconds: it holds a slot
            if "patternProperties" in schema:
                raise UnsupportedSchemaError(["patternProperties at /"])

    seen: list[int] = []
    app = create_app(llm=Compiling([{"answer": {"n": 1}}]), registry=make_registry(), max_concurrent=1, max_queue=0)
    with TestClient(app) as c:
        err = assert_error(c.post("/agent/run", json={"task": "x", "output_schema": {
            "type": "object", "patternProperties": {"^a": {}}}}), 400, "unsupported_schema")
        assert err["param"] == "output_schema" and app.state.agentrt.queue.running == 0
        r = c.post("/agent/run", json={"task": "x", "output_schema": {"type": "object"}})
        assert r.status_code == 200 and r.json()["answer"] == {"n": 1}
    assert seen == [1, 1] and app.state.agentrt.queue.running == 0


def test_a_busy_grammar_compiler_is_429_with_retry_after():
    from agentrt.engine.grammar import GrammarBusyError

    with client(raising_llm(GrammarBusyError("all 2 grammar compile slots are busy", retry_after_s=3))) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"messages": USER, "stream": stream,
                                                     "response_format": {"type": "json_object"}})
            err = assert_error(r, 429, "compile slots are busy")
            assert err["code"] == "grammar_compiler_busy" and r.headers["retry-after"] == "3"
        assert c.app.state.agentrt.queue.running == 0
