"""LangChain's own integration suite (`langchain-tests` ChatModelIntegrationTests) on
ChatAgentRT over the embedded SmolLM2-135M model, in-process.

Feature flags are set truthfully: tool calling, tool_choice, structured output, JSON mode
and usage metadata (with prefix-cache reads) are supported; image/audio/PDF inputs are
not (those tests skip by the suite's own flags). The model is loaded once per process and
shared by every test (`agentrt.langchain.shared_local_llm`).

A few tests ask more of a 135M model than it can do. Each is an xfail that only counts
when the failure is shown to be the model's: every generation is recorded (a callback
on the model), and on failure a diagnosis must find the cause in the model's output
(cut at max_tokens while repeating itself, answering instead of calling a tool, wrong
argument values) to raise `ModelTooWeak`, the only exception the xfail accepts. Any
other failure, e.g. an adapter bug, fails the test. test_langchain_standard_scripted.py
runs the same suite with a scripted model behind the same adapter: all of these pass.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests (dev extra) is not installed")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from agentrt.langchain import ChatAgentRT
from tests.helpers.langchain import ChatAgentRTFeatures

pytestmark = pytest.mark.e2e

MAX_TOKENS = 40


class ModelTooWeak(Exception):
    """A standard test failed because of what the 135M model generated (diagnosed)."""


class _Recorder(BaseCallbackHandler):
    """Keeps every message the chat model produced (invoke and stream alike)."""

    def __init__(self) -> None:
        self.messages: list[BaseMessage] = []

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        for generations in response.generations:
            self.messages.extend(g.message for g in generations)


def cut_at_max_tokens(messages: list[BaseMessage]) -> str | None:
    """The model ran out of tokens before its JSON closed (it repeats itself): either the output
    was cut, or the grammar had to close it at max_tokens (``closed_by_budget``), e.g. after the
    model repeated the same call instead of closing the list after one."""
    for m in messages:
        meta = m.response_metadata
        if meta.get("finish_reason") == "length" or meta.get("closed_by_budget"):
            text = m.content or (m.invalid_tool_calls[0]["args"] if getattr(m, "invalid_tool_calls", None) else "")
            text = text or [(c["name"], c["args"]) for c in getattr(m, "tool_calls", [])]
            how = "was cut" if meta.get("finish_reason") == "length" else "was closed by the grammar"
            return f"the model's output {how} at max_tokens={MAX_TOKENS} before its JSON closed: {str(text)[:120]!r}"
    return None


def answered_instead_of_calling(messages: list[BaseMessage]) -> str | None:
    """With tool_choice auto the model chose to answer in text rather than call the tool."""
    for m in messages:
        if isinstance(m, AIMessage) and not m.tool_calls and m.response_metadata.get("finish_reason") == "stop":
            return f"with tool_choice='auto' the model answered {str(m.content)[:100]!r} instead of calling the tool"
    return None


def wrong_arguments(expected: dict[str, Any]) -> Callable[[list[BaseMessage]], str | None]:
    """The model called the tool, validly, but with other values than the prompt's."""

    def diagnose(messages: list[BaseMessage]) -> str | None:
        for m in messages:
            for call in getattr(m, "tool_calls", []):
                if call["args"] != expected:
                    return f"the model called {call['name']}({call['args']}) where the prompt asks for {expected}"
        return None

    return diagnose


class TestChatAgentRTIntegration(ChatAgentRTFeatures, ChatModelIntegrationTests):
    @property
    def recorder(self) -> _Recorder:
        if not hasattr(self, "_recorder"):
            self._recorder = _Recorder()
        return self._recorder

    @property
    def chat_model_class(self) -> type[ChatAgentRT]:
        return ChatAgentRT

    @property
    def chat_model_params(self) -> dict:
        # Greedy and short: the suite runs ~80 generations on 2 CPU cores.
        return {"max_tokens": MAX_TOKENS, "temperature": 0.0, "callbacks": [self.recorder]}

    @property
    def model_override_value(self) -> str:
        # The embedded GGUF by its path: resolves to the same shared engine (no second load)
        # while going through the per-call model path of the adapter.
        from agentrt.engine.loader import embedded_model_path

        return str(embedded_model_path())

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model = self.chat_model_class(max_tokens=8)
        prompt = "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 8
        model.invoke(prompt)  # the second call finds the prompt in the prefix cache
        if not stream:
            msg = model.invoke(prompt)
        else:
            msg = None
            for chunk in model.stream(prompt):
                msg = chunk if msg is None else msg + chunk
        assert msg.usage_metadata["input_token_details"]["cache_read"] > 0
        return msg

    # -- the tests the 135M model is too weak for (diagnosed, see the module doc) --------

    def _model_at_fault(self, test: Callable[..., Any], diagnoses: list[Callable[[list[BaseMessage]], str | None]],
                        *args: Any) -> None:
        """Run the standard ``test``; on failure, raise ModelTooWeak if a diagnosis finds
        the cause in the recorded generations, else let the failure stand."""
        try:
            test(*args)
        except Exception as exc:
            self._diagnose(exc, diagnoses)
            raise

    def _diagnose(self, exc: Exception, diagnoses: list[Callable[[list[BaseMessage]], str | None]]) -> None:
        for diagnose in diagnoses:
            reason = diagnose(self.recorder.messages)
            if reason:
                raise ModelTooWeak(reason) from exc

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason="SmolLM2-135M fills the 'answer_style' string with repetition until max_tokens")
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        self._model_at_fault(super().test_bind_runnables_as_tools, [cut_at_max_tokens], model)

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason="SmolLM2-135M repeats the joke's setup ('the cat was a cat, and ...') until "
                              "max_tokens, so the required punchline never comes")
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: BaseChatModel, schema_type: Any) -> None:
        self._model_at_fault(super().test_structured_output, [cut_at_max_tokens], model, schema_type)

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason="SmolLM2-135M repeats the joke's setup until max_tokens (no punchline)")
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: Any) -> None:
        try:
            await super().test_structured_output_async(model, schema_type)
        except Exception as exc:
            self._diagnose(exc, [cut_at_max_tokens])
            raise

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason="SmolLM2-135M repeats the joke's setup until max_tokens (no punchline)")
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        self._model_at_fault(super().test_structured_output_pydantic_2_v1, [cut_at_max_tokens], model)

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason="SmolLM2-135M repeats the call ({'tool':'magic_function_no_args',...},{...},...) "
                              "until max_tokens instead of closing the list after one")
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        self._model_at_fault(super().test_tool_calling_with_no_arguments, [cut_at_max_tokens], model)

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason=f"CJK names take several tokens a character and SmolLM2-135M pads the description: "
                              f"the call is cut at max_tokens={MAX_TOKENS} (passes at 64: see "
                              f"test_unicode_arguments_on_the_embedded_model)")
    def test_unicode_tool_call_integration(self, model: BaseChatModel, **kwargs: Any) -> None:
        self._model_at_fault(super().test_unicode_tool_call_integration, [cut_at_max_tokens], model)

    @pytest.mark.xfail(raises=ModelTooWeak, strict=False,
                       reason="SmolLM2-135M answers 'What is the weather in San Francisco' in text instead of "
                              "calling get_weather (tool_choice auto)")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        self._model_at_fault(super().test_agent_loop, [answered_instead_of_calling, cut_at_max_tokens], model)


def test_unicode_arguments_on_the_embedded_model() -> None:
    """The standard unicode test's first request with room for CJK tokens: the name
    comes back in the arguments as characters, not escapes."""
    from langchain_core.tools import tool

    @tool
    def unicode_customer(customer_name: str, description: str) -> str:
        """Tool for creating a customer with Unicode name.

        Args:
            customer_name: The customer's name in their native language.
            description: Description of the customer.
        """
        return f"Created customer: {customer_name} - {description}"

    model = ChatAgentRT(max_tokens=64).bind_tools([unicode_customer], tool_choice="any")
    msg = model.invoke("Create a customer named '你好啊集团' (Hello Group) - a Chinese technology company")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "unicode_customer"
    assert "你好" in msg.tool_calls[0]["args"]["customer_name"]
