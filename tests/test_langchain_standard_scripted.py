"""LangChain's integration suite on ChatAgentRT with a scripted model behind the adapter.

`ScriptedLLM` here plays a capable model (`oracle_reply`: it copies numbers and quoted
names from the request into the arguments of the first tool the grammar allows, fills
output schemas, and answers once tool results are in). Every adapter path the suite
exercises is thus shown working independently of the 135M model's ability, in
particular the tests that model is too weak for (see test_langchain_standard.py).
"""
from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests (dev extra) is not installed")

from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from agentrt.langchain import ChatAgentRT
from agentrt.testing import ScriptedLLM
from tests.helpers.langchain import ChatAgentRTFeatures, oracle_reply


def scripted_oracle() -> ScriptedLLM:
    return ScriptedLLM([oracle_reply] * 200)


class TestChatAgentRTScriptedIntegration(ChatAgentRTFeatures, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatAgentRT]:
        return ChatAgentRT

    @property
    def chat_model_params(self) -> dict:
        return {"llm": scripted_oracle(), "max_tokens": 64}

    @property
    def supports_model_override(self) -> bool:
        # An llm= object serves one model (a per-call model= is refused with a ValueError);
        # per-call models are covered on the embedded model in test_langchain_standard.py.
        return False

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model = self.chat_model_class(**self.chat_model_params)
        prompt = "Repeat after me: " + "the quick brown fox jumps over the lazy dog. " * 8
        model.invoke(prompt)  # the second call finds the prompt in the (simulated) cache
        if not stream:
            return model.invoke(prompt)
        full = None
        for chunk in model.stream(prompt):
            full = chunk if full is None else full + chunk
        return full
