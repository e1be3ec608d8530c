"""The LLM protocol the planner, server and LangChain adapter talk to, and the values it carries.

An LLM here takes plain chat messages ({"role": "system"|"user"|"assistant",
"content": str}: tools are already rendered into them by `agentrt.prompting`) and an
optional JSON Schema that the output must satisfy, and returns text. `agentrt.llm.LocalLLM`
runs the engine in-process; `agentrt.remote.RemoteLLM` talks to any OpenAI-compatible server.
Both import this module; it imports neither.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from agentrt.types import Usage

ChatMessage = dict[str, str]
FinishReason = Literal["stop", "length", "abort"]


class GenerationParams(BaseModel):
    """Sampling settings of one generation. temperature 0 means greedy.

    ``priority`` orders the local engine's queue (lower first, on this process's
    `time.perf_counter` clock; None = arrival order). The planner sets it to the run's start
    time so a run's later steps go ahead of work that arrived after the run started.
    `RemoteLLM` does not send it (servers differ in whether and how they accept one).
    """

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    priority: float | None = None


class Completion(BaseModel):
    """A finished generation with its usage and timings."""

    text: str
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    forced_tokens: int = 0
    # the grammar narrowed the model's choices to finish the JSON within max_tokens (a string or
    # number may be shorter than the model would have written it; the value is complete and valid)
    closed_by_budget: bool = False


class CompletionChunk(BaseModel):
    """A piece of a streamed generation; the last one has ``completion`` set."""

    delta: str = ""
    completion: Completion | None = None


async def final_completion(chunks: AsyncIterator[CompletionChunk]) -> Completion:
    """Drain a stream of chunks and return the `Completion` its last chunk carries."""
    last: Completion | None = None
    async for chunk in chunks:
        last = chunk.completion or last
    if last is None:
        raise RuntimeError("the stream ended without a final completion")
    return last


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
