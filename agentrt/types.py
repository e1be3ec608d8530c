"""Wire types shared by the planner, the server and the LangChain adapter."""
from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field


def new_call_id() -> str:
    """A fresh tool-call id, ``call_<24 hex digits>``."""
    return "call_" + secrets.token_hex(12)


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


# ---------------------------------------------------------------- the planner's trace

RunStatus = Literal["completed", "max_steps", "cancelled", "budget_exceeded", "error"]


class Step(BaseModel):
    """One model turn of an agent run and the tool calls it made.

    ``text`` is the model's raw output; ``error`` is set when the turn did not parse or its
    answer failed validation (the message was fed back to the model). Timings in seconds;
    ``cached_tokens`` of ``prompt_tokens`` were served from the prefix cache; ``closed_by_budget``:
    the grammar made the model finish its JSON early to fit max_tokens (complete and valid, but a
    string or number may be shorter than the model meant). ``tool_time_s``: how long the step waited
    for its tools after the model's turn was complete; ``tool_time_hidden_s``: tool time that ran
    while the model was still decoding (calls started early, see ``Agent(eager_tools=...)``).
    """

    index: int
    text: str = ""
    calls: list[ToolCall] = Field(default_factory=list)
    results: list[ToolResult] = Field(default_factory=list)
    answer: Any = None
    error: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    forced_tokens: int = 0
    draft_tokens: int = 0  # of the completion tokens, those verified from prompt-lookup drafts
    closed_by_budget: bool = False
    ttft_s: float = 0.0
    decode_s: float = 0.0
    tool_time_s: float = 0.0
    tool_time_hidden_s: float = 0.0
    duration_s: float = 0.0


class RunResult(BaseModel):
    """The outcome of ``Agent.run``: status, answer (a str or the output type), full trace."""

    run_id: str
    status: RunStatus
    answer: Any = None
    error: str | None = None
    steps: list[Step] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    duration_s: float = 0.0


class StepStarted(BaseModel):
    """A model turn begins (``step`` counts from 1)."""

    type: Literal["step_started"] = "step_started"
    run_id: str
    step: int


class ToolCallEvent(BaseModel):
    """The model called a tool; the call is about to run."""

    type: Literal["tool_call"] = "tool_call"
    run_id: str
    step: int
    call: ToolCall


class ToolResultEvent(BaseModel):
    """A tool call finished (successfully or with an error the model will read)."""

    type: Literal["tool_result"] = "tool_result"
    run_id: str
    step: int
    result: ToolResult


class StepFinished(BaseModel):
    """A model turn and its tool calls are done; ``step`` holds the whole record."""

    type: Literal["step_finished"] = "step_finished"
    run_id: str
    step: Step


class FinalAnswer(BaseModel):
    """The model gave its final answer (already validated against the output type)."""

    type: Literal["final_answer"] = "final_answer"
    run_id: str
    answer: Any = None


class RunFinished(BaseModel):
    """The last event of every run, whatever its status."""

    type: Literal["run_finished"] = "run_finished"
    run_id: str
    result: RunResult


AgentEvent = Annotated[
    Union[StepStarted, ToolCallEvent, ToolResultEvent, StepFinished, FinalAnswer, RunFinished],
    Field(discriminator="type"),
]
