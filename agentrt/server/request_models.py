"""The request bodies, as pydantic models: OpenAI's ``/v1/chat/completions`` and agentrt's
``/agent/run``. They are the app's OpenAPI schema, and FastAPI answers a body that does
not fit them with a 400 naming the field (see `errors.validation_error`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range a torch.Generator seed takes


class _Loose(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, logprobs=False...): accept them.
    model_config = ConfigDict(extra="allow")


class FunctionCallIn(_Loose):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Loose):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ContentPart(_Loose):
    type: str
    text: str | None = None


class ChatMessageIn(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Loose):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Loose):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Loose):
    name: str


class NamedToolChoice(_Loose):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Loose):
    name: str = Field(default="output", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatCompletionRequest(_Loose):
    """The body of ``POST /v1/chat/completions`` (OpenAI's, minus what a local model cannot do:
    ``n`` must be 1; logprobs are not returned)."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=100000)  # vLLM / SGLang extension
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # what a 64-bit generator seed holds
    n: int = Field(default=1, ge=1, le=1)
    # Accepted so clients that send ``logprobs: false`` work; asking for them is a 400, not a silent None.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # a client's agent loop sends the same key each turn: the engine keeps the turn's KV pinned for the next
    prompt_cache_key: str | None = Field(default=None, max_length=256)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by this server; leave logprobs unset or false")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("stop sequences must be non-empty strings (an empty one would match everywhere)")
        return v


class AgentRunRequest(_Loose):
    """The body of ``POST /agent/run``: a task (or a transcript), which of the server's
    tools the agent may use, and how long it may take."""

    task: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessageIn] | None = Field(default=None, min_length=1)
    tools: list[str] | None = None  # None: every tool of the server's registry
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    max_steps: int = Field(default=8, ge=1, le=64)
    output_schema: dict[str, Any] | None = None
    system_prompt: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
