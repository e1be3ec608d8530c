"""The LLM protocol the planner, server and LangChain adapter talk to.

An LLM here takes plain chat messages ({"role": "system"|"user"|"assistant",
"content": str}: tools are already rendered into them by `agentrt.prompting`) and an
optional JSON Schema that the output must satisfy, and returns text. `LocalLLM` runs the
engine in-process; `RemoteLLM` talks to any OpenAI-compatible server.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from agentrt.types import Usage

ChatMessage = dict[str, str]
FinishReason = Literal["stop", "length", "abort"]


class GenerationParams(BaseModel):
    """Sampling settings of one generation. temperature 0 means greedy."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class Completion(BaseModel):
    """A finished generation with its usage and timings."""

    text: str
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    forced_tokens: int = 0


class CompletionChunk(BaseModel):
    """A piece of a streamed generation; the last one has ``completion`` set."""

    delta: str = ""
    completion: Completion | None = None


@runtime_checkable
class LLM(Protocol):
    """Anything that turns chat messages (+ an optional JSON Schema) into text."""

    model_name: str

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> Completion: ...

    def stream(
        self,
        messages: list[ChatMessage],
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[CompletionChunk]: ...
