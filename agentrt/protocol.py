"""The LLM protocol the planner, server and LangChain adapter talk to, and the values it carries.

An LLM here takes plain chat messages ({"role": "system"|"user"|"assistant",
"content": str}: tools are already rendered into them by `agentrt.prompting`), or a `Prompt`
it prepared from them, and an optional JSON Schema that the output must satisfy, and returns
text. `agentrt.llm.LocalLLM` runs the engine in-process; `agentrt.remote.RemoteLLM` talks to any
OpenAI-compatible server. Both import this module; it imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from agentrt.types import Usage

ChatMessage = dict[str, str]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Prompt:
    """A transcript prepared once by `LLM.prepare_prompt`: the messages and, for an in-process model,
    the text its chat template rendered and the token ids the engine will run (None for an LLM that
    tokenizes elsewhere, such as a remote server). Handed to `LLM.complete`/`LLM.stream` in place of
    the messages, nothing is rendered or tokenized twice."""

    messages: list[ChatMessage]
    text: str | None = None
    token_ids: list[int] | None = None


def prompt_messages(prompt: list[ChatMessage] | Prompt) -> list[ChatMessage]:
    """The chat messages of a prompt given either way."""
    return prompt.messages if isinstance(prompt, Prompt) else prompt


class GenerationParams(BaseModel):
    """Sampling settings of one generation. temperature 0 means greedy.

    ``priority`` orders the local engine's queue (lower first, on this process's
    `time.perf_counter` clock; None = arrival order). The planner sets it to the run's start
    time so a run's later steps go ahead of work that arrived after the run started.
    `RemoteLLM` does not send it (servers differ in whether and how they accept one).

    ``prompt_cache_key`` (OpenAI's name): the local engine keeps this generation's KV pinned in its
    prefix cache for the key's next generation (until it arrives, `release_prompt_cache`, or
    ``EngineConfig.kv_pin_ttl_s``); the planner sets the run's id, so a crowded pool keeps the
    prefix that the run's next step reuses while its tools run.
    """

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    priority: float | None = None
    prompt_cache_key: str | None = None


class Completion(BaseModel):
    """A finished generation with its usage and timings."""

    text: str
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    forced_tokens: int = 0
    draft_tokens: int = 0  # output tokens verified from prompt-lookup drafts (local engine, greedy)
    queue_s: float | None = None  # waiting in the engine's queue before the first prefill (None: not known)
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
    """Anything that turns chat messages (+ an optional JSON Schema) into text.

    Besides generating, it says what a server must check before a request takes a slot:
    ``context_window`` (tokens; None = unknown here), `prepare_prompt` (renders and tokenizes once:
    the `Prompt` carries the token count), `prepare_schema` (compiles a schema, raising for what it
    cannot enforce). `BaseLLM` gives the defaults of an LLM that can do none of that locally."""

    model_name: str

    @property
    def context_window(self) -> int | None: ...

    @property
    def engine_summary(self) -> str:
        """What runs the model, for start-up lines (e.g. the local engine's path and kernels)."""
        ...

    def prepare_prompt(self, messages: list[ChatMessage]) -> Prompt:
        """The prompt for ``messages`` (CPU work that grows with the transcript: call it from a
        worker thread). Raises what the chat template raises for messages it cannot render."""
        ...

    def prepare_schema(self, json_schema: dict[str, Any]) -> None:
        """Get ``json_schema`` ready for constrained decoding (compiled and cached, where the LLM
        compiles); raises `agentrt.engine.grammar.UnsupportedSchemaError` naming what it cannot enforce."""
        ...

    def stats(self) -> Any:
        """Engine statistics (a dataclass of numbers) for metrics, or None."""
        ...

    def close(self) -> None: ...

    async def complete(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> Completion: ...

    def stream(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[CompletionChunk]: ...


class BaseLLM:
    """The `LLM` protocol's defaults for an LLM that neither counts tokens nor compiles schemas
    locally (a remote server, a scripted test double): subclass it and write complete/stream."""

    model_name: str = ""

    @property
    def context_window(self) -> int | None:
        return None

    @property
    def engine_summary(self) -> str:
        return type(self).__name__

    def prepare_prompt(self, messages: list[ChatMessage]) -> Prompt:
        return Prompt(messages=list(messages))

    def prepare_schema(self, json_schema: dict[str, Any]) -> None:
        return None

    def stats(self) -> Any:
        return None

    def close(self) -> None:
        return None
