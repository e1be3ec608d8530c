"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The request becomes a `PromptPlan` (`chat_request`); tool-call arguments are generated
under the grammar of the tools' JSON Schemas, never parsed after the fact. Streaming
follows OpenAI's chunks: the role, content or tool-call deltas (``index``/``id``/``name``
once, then argument fragments), the finish reason, optional usage, ``[DONE]``. The
server never runs a tool here: tool calls go back to the client, as OpenAI does.
"""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask

from agentrt.llm import Completion, CompletionChunk, GenerationParams, Prompt
from agentrt.openai_format import salvage_cut_turn, streamed_turn_texts, tool_call_json, usage_json
from agentrt.prompting import PromptPlan, compact_json, parse_turn
from agentrt.server.chat_request import checked_request
from agentrt.server.errors import APIError
from agentrt.server.limits import QueueTicket, check_api_key
from agentrt.server.request_models import ChatCompletionRequest
from agentrt.server.state import ServerState, get_state
from agentrt.server.streams import (TurnEnd, TurnFailed, close, drain, first_chunk, sse, sse_response, turn_events,
                                    unless_disconnected)
from agentrt.stream_parser import ContentDelta, ToolCallArgsDelta, ToolCallStart
from agentrt.tracing import traced_stream
from agentrt.types import Usage

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/v1/models")
async def models(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """The one model this server serves."""
    return {"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "agentrt"}]}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           state: ServerState = Depends(get_state)) -> Any:
    """OpenAI-compatible chat completions with grammar-constrained tool calls."""
    # off the event loop: a long prompt takes a while to tokenize, and /health must not wait for it
    plan, prompt, params = await anyio.to_thread.run_sync(checked_request, state.llm, req)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream, first, ticket = await start_generation(state, plan, prompt, params)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = ChunkWriter(cid, created, state.model_name)
        body = stream_chat(state, plan, stream, first, ticket, chunks, include_usage)
        return sse_response(body, BackgroundTask(finish_stream, stream, ticket))
    completion = await finish_generation(state, request, stream, first, ticket)
    message, finish = completion_message(completion, plan)
    return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage_json(completion.usage)}


async def start_generation(state: ServerState, plan: PromptPlan, prompt: Prompt, params: GenerationParams
                           ) -> tuple[AsyncIterator[CompletionChunk], CompletionChunk | None, QueueTicket]:
    """Take an admission slot, start the generation and read its first chunk, so that input errors
    (schema, context window) are still a 4xx; on any failure the slot and the generation are let go."""
    ticket = await state.queue.acquire()
    stream = traced_stream(state.llm.stream(prompt, json_schema=plan.json_schema, params=params),
                           state.model_name, params, plan.json_schema)
    try:
        first = await first_chunk(stream)
    except BaseException:
        await close(stream)
        ticket.release()
        raise
    return stream, first, ticket


async def finish_generation(state: ServerState, request: Request, stream: AsyncIterator[CompletionChunk],
                            first: CompletionChunk | None, ticket: QueueTicket) -> Completion:
    """A started generation's whole `Completion` for a non-streamed answer (cancelled if the client
    leaves first); the slot is given back and the usage counted."""
    try:
        completion = await unless_disconnected(request, lambda: drain(stream, first))
    finally:
        await close(stream)
        ticket.release()
    state.metrics.observe_usage(completion.usage, completion.ttft_s)
    return completion


def completion_message(completion: Completion, plan: PromptPlan) -> tuple[dict[str, Any], str]:
    """(the OpenAI assistant message, finish_reason) of a finished completion."""
    if completion.finish_reason == "length" and plan.mode == "tools":
        # Cut before the JSON closed: no tool call is passed off as complete.
        return {"role": "assistant", "content": salvage_cut_turn(completion.text).content}, "length"
    finish = "length" if completion.finish_reason == "length" else "stop"
    if plan.mode != "tools":
        return {"role": "assistant", "content": completion.text}, finish
    try:
        turn = parse_turn(completion.text, plan)
    except ValueError as e:
        raise APIError(502, f"the model's output did not parse as a turn: {e}", type="server_error",
                       code="model_output_invalid") from None
    # The texts as the model wrote them, which the streamed deltas of the same generation concatenate
    # to: parse_turn's values re-serialized could differ (a float's digits, escapes), so that the same
    # seed would answer differently streamed and not. parse_turn above still decides validity.
    raw = streamed_turn_texts(completion.text)
    if turn.tool_calls:
        texts = raw[1] if raw is not None and len(raw[1]) == len(turn.tool_calls) else [None] * len(turn.tool_calls)
        calls = [tool_call_json(c, t) for c, t in zip(turn.tool_calls, texts)]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    if turn.content is not None and isinstance(turn.answer, str):
        content = turn.content  # a string answer: its characters, unescaped (as the stream sends them)
    elif raw is not None and raw[0] is not None:
        content = raw[0]  # a structured answer: its JSON text as written (the stream's content)
    else:
        content = turn.content if turn.content is not None else compact_json(turn.answer)
    return {"role": "assistant", "content": content}, finish


class ChunkWriter:
    """The ``chat.completion.chunk`` events of one streamed completion."""

    def __init__(self, cid: str, created: int, model: str):
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def delta(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return sse({**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]})

    def event(self, ev: ContentDelta | ToolCallStart | ToolCallArgsDelta) -> str:
        """A parser event as OpenAI's delta: content, a call's start, or argument text."""
        if isinstance(ev, ContentDelta):
            return self.delta({"content": ev.text})
        if isinstance(ev, ToolCallStart):
            return self.delta({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                               "function": {"name": ev.name, "arguments": ""}}]})
        return self.delta({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.json_fragment}}]})

    def usage(self, usage: Usage) -> str:
        return sse({**self.head, "choices": [], "usage": usage_json(usage)})

    @staticmethod
    def error(message: str, code: str = "model_output_invalid") -> str:
        """The stream's last words when the model's output cannot be streamed on."""
        err = APIError(502 if code == "model_output_invalid" else 500, message, type="server_error", code=code)
        return sse(err.body()) + sse("[DONE]")


async def stream_chat(state: ServerState, plan: PromptPlan, stream: AsyncIterator[CompletionChunk],
                      first: CompletionChunk | None, ticket: QueueTicket, chunks: ChunkWriter,
                      include_usage: bool) -> AsyncIterator[str]:
    """OpenAI-style SSE: role, then content / tool-call deltas as the parser finds them,
    then the finish reason (and usage when asked), then ``[DONE]``."""
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        async with aclosing(turn_events(plan, stream, first)) as turn:
            async for item in turn:
                if isinstance(item, TurnFailed):
                    yield chunks.error(item.message, item.code)
                    return
                if not isinstance(item, TurnEnd):
                    yield chunks.event(item)
                    continue
                yield chunks.delta({}, item.finish)
                state.metrics.observe_usage(item.completion.usage, item.completion.ttft_s)
                if include_usage:
                    yield chunks.usage(item.completion.usage)
                yield sse("[DONE]")
    finally:
        # A disconnect cancels this generator: abort the generation, free the slot (the
        # response's background task does the same when the server runs it; both are idempotent).
        await finish_stream(stream, ticket)


async def finish_stream(stream: Any, ticket: QueueTicket) -> None:
    """After a streamed response (sent in full or cut by a disconnect): end the generation
    and give back the slot."""
    await close(stream)
    ticket.release()
