"""An OpenAI chat request -> the turn's `PromptPlan` and `GenerationParams`, checked.

Everything a request can get wrong is found here, before a slot is taken or a token
generated, and raised as a 400 `APIError` naming the field: a tool call whose arguments
are not a JSON object, a schema that is not a JSON Schema, a named tool_choice that is
not among the tools, max_tokens or a prompt beyond the model's context window.
``/agent/run`` shares the message and schema checks.
"""
from __future__ import annotations

import json
from typing import Any

from agentrt.protocol import LLM, GenerationParams, Prompt
from agentrt.openai_format import plan_request
from agentrt.prompting import PromptPlan
from agentrt.server.errors import APIError, known_llm_error
from agentrt.server.request_models import ChatCompletionRequest, ChatMessageIn, ContentPart, NamedToolChoice
from agentrt.types import Message, ToolCall, ToolSpec

MAX_TOKENS_CAP = 32768  # when the LLM does not say its context length
MAX_SCHEMA_DEPTH = 128  # levels of objects and arrays in a request's schema (the grammar compiler's limit too)


def _text_of(content: str | list[ContentPart] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{where}: only text content parts are supported, got {part.type!r}",
                           param=where, code="unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def to_messages(messages: list[ChatMessageIn]) -> list[Message]:
    """OpenAI chat messages -> agentrt `Message`s (tool-call arguments decoded)."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        content = _text_of(m.content, f"{where}.content")
        calls = []
        for j, c in enumerate(m.tool_calls or []):
            try:
                args = json.loads(c.function.arguments or "{}")
            except json.JSONDecodeError:
                args = None
            if not isinstance(args, dict):
                raise APIError(400, f"{where}.tool_calls.{j}.function.arguments must be a JSON object string",
                               param=f"{where}.tool_calls.{j}.function.arguments", code="invalid_value")
            calls.append(ToolCall(id=c.id, name=c.function.name, arguments=args))
        if calls and m.role != "assistant":
            raise APIError(400, f"{where}: only assistant messages carry tool_calls", param=where)
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(400, f"{where}: a tool message needs tool_call_id", param=f"{where}.tool_call_id")
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role=role, content=content, tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name))
    return out


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema must be a dict that is itself a valid schema (400 naming ``param`` if not)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON Schema object", param=param, code="invalid_schema")
    depth, level = 0, [schema]
    while level and depth <= MAX_SCHEMA_DEPTH:  # checked before the recursive meta-schema validation
        level = [c for v in level if isinstance(v, (dict, list)) for c in (v.values() if isinstance(v, dict) else v)]
        depth += 1
    if depth > MAX_SCHEMA_DEPTH:
        raise APIError(400, f"{param} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep; that is "
                       "the limit", param=param, code="invalid_schema")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"{param} is not a valid JSON Schema: {e.message}", param=param,
                       code="invalid_schema") from None
    except Exception as e:  # noqa: BLE001 - e.g. an unresolvable $schema or $ref
        raise APIError(400, f"{param} is not a usable JSON Schema: {e}", param=param, code="invalid_schema") from None
    return schema


def check_max_tokens(llm: LLM, max_tokens: int | None) -> int:
    """Refuse a max_tokens over the context window; returns that window (or the cap)."""
    limit = llm.context_window or MAX_TOKENS_CAP
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} exceeds the model's context window ({limit} tokens)",
                       param="max_tokens", code="invalid_value")
    return limit


def unrenderable(exc: Exception) -> APIError:
    """The 400 of a transcript the model's chat template refuses (e.g. its role order)."""
    return APIError(400, f"the messages cannot be rendered with the model's chat template: {exc}",
                    param="messages", code="invalid_messages")


def prepared_prompt(llm: LLM, chat_messages: list[dict[str, str]]) -> Prompt:
    """The LLM's `Prompt` of ``chat_messages`` (rendered and tokenized once, for the length check and
    the generation); a 400 if the chat template refuses them."""
    try:
        return llm.prepare_prompt(chat_messages)
    except Exception as e:  # noqa: BLE001 - the chat template raises what it likes (jinja's TemplateError, ValueError...)
        raise (known_llm_error(e) or unrenderable(e)) from None  # a prompt beyond the context window is known


def chat_plan(req: ChatCompletionRequest) -> PromptPlan:
    """Turn a chat request into the turn's `PromptPlan` (messages + grammar schema)."""
    messages = to_messages(req.messages)
    tools: list[ToolSpec] = []
    for i, t in enumerate(req.tools or []):
        params = t.function.parameters or {"type": "object", "properties": {}}
        check_schema(params, f"tools.{i}.function.parameters")
        if params.get("type", "object") != "object":
            raise APIError(400, f"tools.{i}.function.parameters must describe an object (type: object)",
                           param=f"tools.{i}.function.parameters", code="invalid_schema")
        tools.append(ToolSpec(name=t.function.name, description=t.function.description or "", parameters=params))
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool_choice = choice.function.name
        if tool_choice not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "(no tools given)"
            raise APIError(400, f"tool_choice names {tool_choice!r}, which is not in tools ({known})",
                           param="tool_choice", code="unknown_tool")
    else:
        tool_choice = choice or "auto"
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice")
    output_schema = None
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        output_schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                           param="response_format.json_schema.schema")
        output_schema = check_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
    try:
        # the messages stay the prompt as they are and the grammar enforces response_format, as OpenAI's API,
        # vLLM and SGLang do: a remote planner (RemoteLLM) has already rendered its instructions into them
        return plan_request(messages, tools, tool_choice, req.parallel_tool_calls, output_schema,
                            instruct_schema=False)
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from None


def generation_params(llm: LLM, prompt: Prompt, plan: PromptPlan, req: ChatCompletionRequest) -> GenerationParams:
    """The request's sampling settings, checked against the model's context window."""
    max_tokens = req.max_completion_tokens or req.max_tokens
    limit = check_max_tokens(llm, max_tokens)
    stop = req.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if plan.mode != "text":
        stops = []  # the grammar decides where JSON ends; a stop string would cut it
    params = GenerationParams(
        max_tokens=max_tokens or min(1024, limit),
        temperature=0.0 if req.temperature is None else req.temperature,  # greedy by default: small models
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=stops,
        prompt_cache_key=req.prompt_cache_key,
    )
    n = None if prompt.token_ids is None else len(prompt.token_ids)
    if n is not None and n + params.max_tokens > limit:
        if max_tokens is not None or n >= limit:
            raise APIError(400, f"the prompt has {n} tokens and max_tokens is {params.max_tokens}: together "
                           f"over the context window of {limit} tokens. Shorten the messages or lower max_tokens.",
                           param="messages", code="context_length_exceeded")
        params.max_tokens = limit - n  # the default budget shrinks to what fits
    return params


def checked_request(llm: LLM, req: ChatCompletionRequest) -> tuple[PromptPlan, Prompt, GenerationParams]:
    """`chat_plan`, the prompt and `generation_params` together: the request's whole check, schema
    validation and prompt tokenization included. CPU work that grows with the request: routes run it
    in a worker thread."""
    plan = chat_plan(req)
    prompt = prepared_prompt(llm, plan.chat_messages)
    return plan, prompt, generation_params(llm, prompt, plan, req)
