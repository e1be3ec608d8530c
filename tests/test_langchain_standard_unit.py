"""LangChain's own standard unit suite (`langchain-tests` ChatModelUnitTests) on ChatAgentRT.

These tests build the chat model and inspect it (params, bind_tools, structured output
runnables, init from env); none of them loads a model.
"""
from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests (dev extra) is not installed")

from langchain_tests.unit_tests import ChatModelUnitTests

from agentrt.langchain import ChatAgentRT
from tests.helpers.langchain import ChatAgentRTFeatures


class TestChatAgentRTUnit(ChatAgentRTFeatures, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatAgentRT]:
        return ChatAgentRT

    @property
    def chat_model_params(self) -> dict:
        return {}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return (
            {"AGENTRT_API_KEY": "secret-key", "AGENTRT_BASE_URL": "http://localhost:8000/v1"},
            {"model": "served-model"},
            {"api_key": "secret-key", "base_url": "http://localhost:8000/v1"},
        )
