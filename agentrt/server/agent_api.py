"""The agent routes: ``POST /agent/run`` (plain or Server-Sent Events) and ``GET /tools``.

A run may use only the server's registry (or the subset the request names); the
request is checked whole before a slot is taken: unknown tools, an invalid or
unsupported ``output_schema``, max_tokens or a first prompt beyond the context window
are each a 400. A client that disconnects cancels its run (the generation is aborted
and its KV blocks freed).
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, RootModel
from starlette.background import BackgroundTask

from agentrt.llm import GenerationParams
from agentrt.prompting import plan_turn
from agentrt.server.chat_request import check_max_tokens, check_schema, prepared_prompt, to_messages, unrenderable
from agentrt.server.errors import APIError, known_llm_error
from agentrt.server.limits import QueueTicket, check_api_key
from agentrt.server.request_models import AgentRunRequest
from agentrt.server.state import ServerState, get_state, server_state
from agentrt.server.streams import close, sse, sse_response, unless_disconnected
from agentrt.types import Message

AGENT_RUN_TIMEOUT_S = 600.0  # no run holds a slot longer than this

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/tools")
async def tools(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """The tools ``/agent/run`` may use, with their JSON Schemas."""
    return {"tools": [s.model_dump() for s in state.registry.specs()]}


@router.post("/agent/run")
async def agent_run(req: AgentRunRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    """Run an agent on the server's tools: the answer and the full step trace
    (or, with ``stream: true``, Server-Sent Events as the run goes)."""
    # The slot first: checking output_schema compiles it, which can take seconds of CPU.
    ticket = await state.queue.acquire()
    try:
        agent, task = await build_agent(state, req)
    except BaseException:
        ticket.release()
        raise
    if req.stream:
        return sse_response(stream_run(state, agent, task, ticket), BackgroundTask(ticket.release))
    try:
        result = await unless_disconnected(request, lambda: agent.run(task))
    finally:
        ticket.release()
    for step in result.steps:
        state.metrics.observe_step(step)
    state.metrics.observe_run_end(result)
    return result_json(state, result)


def schema_output_type(schema: dict[str, Any]) -> type[BaseModel]:
    """A pydantic type for `Agent`'s ``output_type`` from a raw JSON Schema: its
    ``model_json_schema()`` is that schema (the grammar) and validation uses jsonschema."""
    import copy

    import jsonschema
    from pydantic import model_validator

    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = validator_cls(schema)

    class SchemaOutput(RootModel[Any]):
        @model_validator(mode="after")
        def _valid(self) -> "SchemaOutput":
            error = jsonschema.exceptions.best_match(validator.iter_errors(self.root))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                raise ValueError(f"the answer does not match output_schema at {where}: {error.message}")
            return self

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return copy.deepcopy(schema)

    return SchemaOutput


async def _compiles(llm: Any, schema: dict[str, Any]) -> None:
    """Compile ``output_schema`` now (unsupported keywords: a 400 now, not a failed run later)."""
    try:
        await anyio.to_thread.run_sync(llm.prepare_schema, schema)
    except Exception as e:
        err = known_llm_error(e)
        if err is None:
            raise
        err.param = "output_schema"
        raise err from None


async def build_agent(state: ServerState, req: AgentRunRequest) -> tuple[Any, str | list[Message]]:
    """Check an ``/agent/run`` request and build its `Agent` (and task) or raise a 400."""
    from agentrt.planner import Agent

    if (req.task is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'task' (a string) or 'messages' (a chat transcript)",
                       param="task", code="invalid_value")
    task: str | list[Message] = req.task if req.task is not None else to_messages(req.messages or [])
    registry = state.registry
    if req.tools is not None:
        unknown = [n for n in req.tools if n not in registry]
        if unknown:
            known = ", ".join(registry.names) or "(none)"
            raise APIError(400, f"unknown tool(s) {', '.join(map(repr, unknown))}; this server's tools: {known}",
                           param="tools", code="unknown_tool")
        registry = registry.subset(req.tools)
    if req.tool_choice == "required" and not registry.names:
        raise APIError(400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice",
                       code="invalid_value")
    output_type = None
    if req.output_schema is not None:
        schema = await anyio.to_thread.run_sync(check_schema, req.output_schema, "output_schema")
        await _compiles(state.llm, schema)
        output_type = schema_output_type(schema)
    check_max_tokens(state.llm, req.max_tokens)
    params = GenerationParams(max_tokens=req.max_tokens or 256,
                              temperature=0.0 if req.temperature is None else req.temperature)
    # tokenizing a long task is CPU work: off the event loop
    await anyio.to_thread.run_sync(_check_first_prompt_fits, state.llm, task, registry, req, output_type, params)
    try:
        agent = Agent(state.llm, registry, system_prompt=req.system_prompt, tool_choice=req.tool_choice,
                      parallel_tool_calls=req.parallel_tool_calls, max_steps=req.max_steps,
                      output_type=output_type, run_timeout_s=AGENT_RUN_TIMEOUT_S, params=params)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice", code="invalid_value") from None
    return agent, task


def _check_first_prompt_fits(llm: Any, task: str | list[Message], registry: Any, req: AgentRunRequest,
                             output_type: Any, params: GenerationParams) -> None:
    """A task too long for the context window is a 400 now, not a failed run later."""
    if not llm.context_window:
        return  # a remote or scripted LLM: the prompt cannot be measured here
    messages = [Message(role="user", content=task)] if isinstance(task, str) else list(task)
    if req.system_prompt:
        messages.insert(0, Message(role="system", content=req.system_prompt))
    schema = output_type.model_json_schema() if output_type is not None else None
    try:
        plan = plan_turn(messages, registry.specs(), req.tool_choice, req.parallel_tool_calls, schema)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice", code="invalid_value") from None
    except Exception as e:  # noqa: BLE001 - the chat template raises what it likes
        raise unrenderable(e) from None
    ids = prepared_prompt(llm, plan.chat_messages).token_ids
    n = None if ids is None else len(ids)
    limit = check_max_tokens(llm, None)
    if n is not None and n + params.max_tokens > limit:
        raise APIError(400, f"the first prompt has {n} tokens and each step may add {params.max_tokens}: over the "
                       f"context window of {limit} tokens. Shorten the task or lower max_tokens.",
                       param="task" if isinstance(task, str) else "messages", code="context_length_exceeded")


def answer_json(answer: Any) -> Any:
    """A run's answer as JSON: a schema answer's value, a model's fields, or the text."""
    if isinstance(answer, RootModel):
        return answer.root
    if isinstance(answer, BaseModel):
        return answer.model_dump(mode="json")
    return answer


def result_json(state: ServerState, result: Any) -> dict[str, Any]:
    """A `RunResult` as the ``/agent/run`` response body."""
    body = result.model_dump(mode="json", exclude={"answer"})
    body["answer"] = answer_json(result.answer)
    body["model"] = state.model_name
    return body


async def stream_run(state: ServerState, agent: Any, task: str | list[Message], ticket: QueueTicket
                     ) -> AsyncIterator[str]:
    """SSE of an agent run: ``event: <type>`` + ``data: <json>`` per step, tool call, tool
    result and final answer; the last event is ``run_finished`` with the whole result.
    A client that disconnects cancels this generator, which closes the run (its
    generation is aborted and its KV blocks freed)."""
    events = agent.astream(task)
    try:
        async for ev in events:
            kind = getattr(ev, "type", type(ev).__name__)
            if kind == "step_finished":
                state.metrics.observe_step(ev.step)
            if kind == "run_finished":
                state.metrics.observe_run_end(ev.result)
                data = {"type": kind, "run_id": ev.run_id, "result": result_json(state, ev.result)}
            elif kind == "final_answer":
                data = {"type": kind, "run_id": ev.run_id, "answer": answer_json(ev.answer)}
            else:
                data = ev.model_dump(mode="json")
            yield sse(data, event=kind)
    finally:
        await close(events)
        ticket.release()
