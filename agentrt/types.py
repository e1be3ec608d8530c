"""Wire types shared by the planner, the server and the LangChain adapter."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ToolCall(BaseModel):
    """One call of a tool by the model: arguments are already valid JSON for its schema."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    """One transcript entry, OpenAI-shaped: an assistant message may carry tool calls,
    and a ``tool`` message answers one call by ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False


class ToolResult(BaseModel):
    """What a tool call returned (or the error it raised / its timeout), as the model reads it."""

    call_id: str
    name: str
    content: str
    is_error: bool = False
    duration_s: float = 0.0


class Usage(BaseModel):
    """Token counts of one generation (or summed over a run)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
        )


class ToolSpec(BaseModel):
    """What the model is told of a tool: name, description and a JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


# "auto": the model may call tools or answer; "required": it must call one or more;
# "none": it must answer; any other string names the one tool it must call.
ToolChoice = str
