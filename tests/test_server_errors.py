"""Engine and grammar input errors (schema keywords, context window) become 400s."""
from __future__ import annotations

from fastapi.testclient import TestClient

from agentrt.server import create_app
from tests._server_util import RaisingLLM
from tests.test_server import USER, assert_error, make_registry


def client(llm) -> TestClient:
    return TestClient(create_app(llm=llm, registry=make_registry()))


def test_engine_input_errors_become_400():
    from agentrt.engine import ContextOverflowError
    from agentrt.engine.grammar.errors import UnsupportedSchemaError

    exc = UnsupportedSchemaError(["patternProperties at /properties/x"])
    with client(RaisingLLM(exc)) as c:
        for stream in (False, True):
            err = assert_error(c.post("/v1/chat/completions", json={"messages": USER, "stream": stream,
                                                                    "response_format": {"type": "json_object"}}), 400)
            assert err["code"] == "unsupported_schema" and "patternProperties" in err["message"]
    with client(RaisingLLM(ContextOverflowError("prompt of 9000 tokens over 8192"))) as c:
        err = assert_error(c.post("/v1/chat/completions", json={"messages": USER}), 400)
        assert err["code"] == "context_length_exceeded"
        assert c.app.state.agentrt.queue.running == 0  # the slot was given back
