"""OpenAI's Responses API, the stateless subset: ``POST /v1/responses``.

The request is translated into the chat request it amounts to (`responses_request`) and then
goes the chat route's way: `checked_request`, the same admission queue, generation and
grammar, so function-call arguments are generated under the tools' JSON Schemas, never parsed
after the fact. Out come Responses output items (``message`` with ``output_text``,
``function_call``), or when streaming, Responses events (``response.created`` ...
``response.completed``) written from the same parser events as the chat chunks. Nothing is
stored and no tool is run here: function calls go back to the client.
"""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask

from agentrt.llm import LLM, CompletionChunk, GenerationParams, Prompt
from agentrt.prompting import PromptPlan
from agentrt.server.chat_request import checked_request
from agentrt.server.errors import APIError
from agentrt.server.limits import QueueTicket, check_api_key
from agentrt.server.openai_api import completion_message, finish_generation, finish_stream, start_generation
from agentrt.server.responses_request import ChatTranslation, ResponsesRequest, to_chat_request
from agentrt.server.state import ServerState, get_state
from agentrt.server.streams import TurnEnd, TurnFailed, sse, sse_response, turn_events
from agentrt.stream_parser import ContentDelta, StreamEvent, ToolCallStart
from agentrt.types import Usage

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    """OpenAI Responses API (stateless: send the whole conversation as input) with grammar-constrained
    function calls."""
    # off the event loop, like the chat route: checking and tokenizing a long input takes a while
    translation, plan, prompt, params = await anyio.to_thread.run_sync(checked_responses_request, state.llm, req)
    try:
        stream, first, ticket = await start_generation(state, plan, prompt, params)
    except APIError as e:  # e.g. a schema the grammar compiler refuses: named as the Responses param
        raise translation.names.error(e) from None
    head = response_head(req, translation, state.model_name)
    if req.stream:
        body = stream_response(state, plan, stream, first, ticket, ResponseEvents(head))
        return sse_response(body, BackgroundTask(finish_stream, stream, ticket))
    completion = await finish_generation(state, request, stream, first, ticket)
    message, finish = completion_message(completion, plan)
    status = "incomplete" if finish == "length" else "completed"
    output = [function_call_item(c["id"], c["function"]["name"], c["function"]["arguments"], "completed")
              for c in message.get("tool_calls") or []]
    content = message.get("content")
    if content is not None and (content or status == "completed"):  # as the stream: no empty text of a cut turn
        output.append(message_item(content, status))
    return finished_response(head, status, output, completion.usage)


def checked_responses_request(llm: LLM, req: ResponsesRequest
                              ) -> tuple[ChatTranslation, PromptPlan, Prompt, GenerationParams]:
    """The request translated and checked as a chat request, its errors named in Responses terms."""
    translation = to_chat_request(req)
    try:
        return (translation, *checked_request(llm, translation.request))
    except APIError as e:
        raise translation.names.error(e) from None


def response_head(req: ResponsesRequest, translation: ChatTranslation, model: str) -> dict[str, Any]:
    """The fields of the response object that echo the request (OpenAI's ``Response``, status aside)."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    return {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "model": model,
        "instructions": req.instructions, "metadata": req.metadata or {},
        "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                   "strict": t.strict} for t in translation.tools],
        "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "temperature": req.temperature, "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
        "previous_response_id": None, "reasoning": None, "store": False, "truncation": "disabled",
        "error": None, "incomplete_details": None, "usage": None,
    }


def finished_response(head: dict[str, Any], status: str, output: list[dict[str, Any]], usage: Usage,
                      error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response object at its end: ``completed``, ``incomplete`` (cut by max_output_tokens) or ``failed``."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {**head, "status": status, "output": output, "completed_at": int(time.time()), "error": error,
            "incomplete_details": incomplete, "usage": usage_json(usage)}


def usage_json(usage: Usage) -> dict[str, Any]:
    """The Responses API's ``usage`` (input/output tokens, cached input tokens; no reasoning tokens here)."""
    # cache_write_tokens: the engine does not count what its prefix cache kept of this prompt
    details = {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0}
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": details,
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def message_item(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    """An assistant ``message`` output item holding one ``output_text`` part."""
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": status,
            "content": [text_part(text)]}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call_id: str, name: str, arguments: str, status: str,
                       item_id: str | None = None) -> dict[str, Any]:
    """A ``function_call`` output item: the client runs it and sends back a ``function_call_output``."""
    return {"type": "function_call", "id": item_id or f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class ResponseEvents:
    """The Responses API's SSE events of one streamed response. Output items open as the parser finds
    them (a message at its first text, a function call at its name), get their deltas, and close
    (``*.done`` events) before the next one opens and at the end; every event has its sequence number."""

    def __init__(self, head: dict[str, Any]):
        self.head = head
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed (a message's content stays [] until done)
        self.text = ""  # the open message's text so far
        self.calls: dict[int, tuple[dict[str, Any], int]] = {}  # the parser's call index -> (item, output index)

    def _sse(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(event, event=kind)

    def started(self) -> list[str]:
        """``response.created`` and ``response.in_progress``."""
        response = {**self.head, "status": "in_progress", "output": []}
        return [self._sse("response.created", response=response),
                self._sse("response.in_progress", response=response)]

    def event(self, ev: StreamEvent) -> list[str]:
        """The events of one parser event: its text or arguments delta, after opening its item if new."""
        if isinstance(ev, ToolCallStart):
            out = self.close("completed") + self._add(function_call_item(ev.id, ev.name, "", "in_progress"))
            self.calls[ev.index] = (self.output[-1], len(self.output) - 1)
            return out
        out: list[str] = []
        if isinstance(ev, ContentDelta):
            if self.open is None or self.open["type"] != "message":
                out = self.close("completed") + self._add_message()
            self.text += ev.text
            out.append(self._sse("response.output_text.delta", **self._where(), content_index=0, delta=ev.text,
                                 logprobs=[]))
            return out
        item, index = self.calls[ev.index]  # the parser starts a call before any of its arguments
        item["arguments"] += ev.json_fragment
        return [self._sse("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=ev.json_fragment)]

    def close(self, status: str) -> list[str]:
        """Close the open item, if any: its text or arguments done, then ``response.output_item.done``."""
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        item["status"] = status
        if item["type"] == "message":
            part = text_part(self.text)
            item["content"] = [part]
            self.text = ""
            out = [self._sse("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]),
                   self._sse("response.content_part.done", **where, content_index=0, part=part)]
        else:
            out = [self._sse("response.function_call_arguments.done", **where, arguments=item["arguments"])]
        return out + [self._sse("response.output_item.done", output_index=where["output_index"], item=item)]

    def ended(self, end: TurnEnd) -> list[str]:
        """The open item closed, then ``response.completed`` (or ``response.incomplete``: cut by
        max_output_tokens) with the whole response; a turn that said nothing still has its (empty) message."""
        status = "incomplete" if end.finish == "length" else "completed"
        out = self.close(status)
        if not self.output and status == "completed":
            out += self._add_message() + self.close("completed")
        response = finished_response(self.head, status, self.output, end.completion.usage)
        return out + [self._sse(f"response.{status}", response=response)]

    def failed(self, failure: TurnFailed) -> list[str]:
        """An ``error`` event, then ``response.failed`` with the output so far (its open item incomplete)."""
        if self.open is not None:
            self.open["status"] = "incomplete"
            if self.open["type"] == "message":
                self.open["content"] = [text_part(self.text)]
            self.open = None
        error = {"code": "server_error", "message": failure.message}
        response = finished_response(self.head, "failed", self.output, Usage(), error=error)
        return [self._sse("error", code=failure.code, message=failure.message, param=None),
                self._sse("response.failed", response=response)]

    def _add(self, item: dict[str, Any]) -> list[str]:
        self.output.append(item)
        self.open = item
        return [self._sse("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def _add_message(self) -> list[str]:
        """Open a message item (no content yet) and its one text part."""
        out = self._add({**message_item("", "in_progress"), "content": []})
        return out + [self._sse("response.content_part.added", **self._where(), content_index=0, part=text_part(""))]

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}


async def stream_response(state: ServerState, plan: PromptPlan, stream: AsyncIterator[CompletionChunk],
                          first: CompletionChunk | None, ticket: QueueTicket, events: ResponseEvents
                          ) -> AsyncIterator[str]:
    """The Responses SSE stream of a started generation, from the same turn events as the chat chunks."""
    try:
        for text in events.started():
            yield text
        async with aclosing(turn_events(plan, stream, first)) as turn:
            async for item in turn:
                if isinstance(item, TurnFailed):
                    out = events.failed(item)
                elif isinstance(item, TurnEnd):
                    state.metrics.observe_usage(item.completion.usage, item.completion.ttft_s)
                    out = events.ended(item)
                else:
                    out = events.event(item)
                for text in out:
                    yield text
    finally:
        # A disconnect cancels this generator: abort the generation and free the slot (idempotent with
        # the response's background task).
        await finish_stream(stream, ticket)
