"""`RemoteLLM`: the `LLM` protocol over any OpenAI-compatible server, for scale-out.

The planner, the tools and the prompting stay on this machine; only generation moves to
a server: vLLM, SGLang, llama.cpp, or another ``agentrt serve``. The step's JSON Schema
goes to the server in the form it enforces (``constrain=``, see `agentrt.remote_formats`):
``response_format`` of type ``json_schema`` (OpenAI, vLLM, SGLang, ``llama-server``, agentrt),
``json_object`` + ``schema`` (llama-cpp-python), or one forced function tool; the default,
``auto``, finds out at the first constrained request which one the server takes. The server
enforces it with its own grammar backend (xgrammar / outlines / GBNF), so tool calls stay
valid whichever server runs the model::

    # on the GPU box
    vllm serve HuggingFaceTB/SmolLM2-1.7B-Instruct --port 8000
    #   or: python -m sglang.launch_server --model-path ... --port 30000
    #   or: agentrt serve --host 0.0.0.0 --port 8000
    # here
    from agentrt.planner import Agent
    from agentrt.remote import RemoteLLM
    agent = Agent(RemoteLLM("http://gpu-box:8000/v1"), my_tools)

Usage reports the server's ``prompt_tokens_details.cached_tokens`` when it sends them
(vLLM needs ``--enable-prompt-tokens-details``); TTFT is measured here, from the request
to the first token of the answer (content, or the tool call's arguments), so it includes the network.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any, AsyncIterator
from urllib.parse import urlparse

from agentrt.protocol import (BaseLLM, ChatMessage, Completion, CompletionChunk, GenerationParams, Prompt,
                              final_completion, prompt_messages)
from agentrt.remote_formats import (CONSTRAIN_CHOICES, MODES, about_format, constraint_fields, rejects_format,
                                    short_reason, tool_arguments)
from agentrt.types import Usage

log = logging.getLogger("agentrt.remote")

# errors after which a probe is sent again through the retrying client (probes themselves do not
# retry, so that a server refusing a format with a 500 is not asked three times)
_TRANSIENT_STATUSES = {408, 409, 429, 502, 503, 504}


class ConstraintUnsupportedError(RuntimeError):
    """The server accepts none of the ways `RemoteLLM` knows to constrain output to a JSON Schema."""


def _normalise_base_url(base_url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1`` (an explicit path is kept as is)."""
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"base_url must be an http(s) URL like 'http://host:8000/v1', got {base_url!r}")
    if parsed.path in ("", "/"):
        return base_url.rstrip("/") + "/v1"
    return base_url.rstrip("/")


def _cached_tokens(usage: Any) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return int(cached or 0)


class RemoteLLM(BaseLLM):
    """An `LLM` served by an OpenAI-compatible endpoint.

    Args:
        base_url: the server's API root, e.g. ``http://gpu-box:8000/v1`` (``/v1`` is added
            when the URL has no path).
        model: the served model's name; None asks the server (``GET /v1/models``) once.
        api_key: sent as ``Authorization: Bearer``; default ``$OPENAI_API_KEY``, or a
            placeholder for servers without keys.
        timeout: seconds for one request.
        max_retries: retries of failed connections / 429 / 5xx (the openai client's backoff).
        schema_name: the ``json_schema.name`` sent with each schema.
        extra_body: more request fields for a particular server (e.g. vLLM's
            ``{"guided_decoding_backend": "xgrammar"}``).
        constrain: how a step's JSON Schema is sent. ``"json_schema"`` (OpenAI, vLLM, SGLang,
            ``llama-server``, agentrt), ``"json_object_schema"`` (llama-cpp-python's server),
            ``"tools"`` (one function tool forced by ``tool_choice``; the answer is read from its
            arguments), ``"none"`` (no constraint: the JSON is only prompted, so replies may be
            invalid), or ``"auto"`` (default): try them in that order at the first constrained
            request, keep the first the server accepts, and raise `ConstraintUnsupportedError`
            if it accepts none. Requests without a schema never carry a constraint.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 2,
        schema_name: str = "agentrt_turn",
        extra_body: dict[str, Any] | None = None,
        constrain: str = "auto",
    ):
        import openai

        if constrain not in CONSTRAIN_CHOICES:
            raise ValueError(f"constrain must be one of {', '.join(CONSTRAIN_CHOICES)}, got {constrain!r}")
        self.base_url = _normalise_base_url(base_url)
        self.model_name: str = model or ""
        self.schema_name = schema_name
        self.extra_body = dict(extra_body or {})
        self.constrain = constrain
        # the mode in use: known from the start unless "auto", which sets it at its first constrained request
        self.constrain_mode: str | None = None if constrain == "auto" else constrain
        self._new_client = functools.partial(
            openai.AsyncOpenAI, base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed", timeout=timeout,
            max_retries=max_retries)
        self._client = self._new_client()
        self._detect_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop the client's connections belong to
        if constrain == "none":
            log.warning("RemoteLLM(%s, constrain='none'): output is not constrained to the step's JSON Schema; "
                        "replies are only prompted to be valid JSON and tool calls may be invalid", self.base_url)

    @property
    def client(self) -> Any:
        """The OpenAI client for the running event loop (see `_bind_loop`)."""
        self._bind_loop()
        return self._client

    def _bind_loop(self) -> None:
        """Give the running event loop its own client and detection lock. A client's pooled connections belong
        to the loop that opened them, so a RemoteLLM used again under another loop (a second
        `Agent.run_sync`, a second ``anyio.run``) would otherwise fail with "Event loop is closed"."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is not loop:
            if self._loop is not None:
                self._client, self._detect_lock = self._new_client(), asyncio.Lock()
            self._loop = loop

    @property
    def engine_summary(self) -> str:
        if self.constrain_mode == "none":
            return f"served by {self.base_url}, unconstrained (JSON only prompted)"
        if self.constrain_mode is None:
            return f"served by {self.base_url}, constraint detected at the first request"
        return f"served by {self.base_url}, constrained by {self.constrain_mode}"

    async def _model(self) -> str:
        if not self.model_name:
            models = await self.client.models.list()
            if not models.data:
                raise RuntimeError(f"the server at {self.base_url} lists no models; pass model=...")
            self.model_name = models.data[0].id
        return self.model_name

    def _request(self, model: str, messages: list[ChatMessage], json_schema: dict[str, Any] | None,
                 params: GenerationParams, mode: str | None = None) -> dict[str, Any]:
        """The request's keyword arguments; ``mode`` says how ``json_schema`` is sent (None: not at all)."""
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if json_schema is not None and mode not in (None, "none"):
            kwargs.update(constraint_fields(mode, json_schema, self.schema_name))
        extra = dict(self.extra_body)
        if params.top_k:
            extra["top_k"] = params.top_k  # vLLM / SGLang / agentrt extension
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    async def complete(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> Completion:
        """One generation; streamed underneath so that TTFT is measured."""
        return await final_completion(self.stream(messages, json_schema=json_schema, params=params))

    async def stream(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        """Text deltas as the server sends them, then the `Completion`. Closing this
        iterator early closes the HTTP stream, so the server aborts the generation.
        In ``tools`` mode the text is the forced tool call's arguments."""
        params = params or GenerationParams()
        model = await self._model()
        start = time.perf_counter()
        first_at: float | None = None
        parts: list[str] = []
        stray: list[str] = []  # content in tools mode: the answer only if no tool call comes
        finish: str | None = None
        usage = Usage()
        response, mode = await self._open(model, prompt_messages(messages), json_schema, params)
        try:
            async for chunk in response:
                if chunk.usage is not None:
                    usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens or 0,
                        completion_tokens=chunk.usage.completion_tokens or 0,
                        cached_tokens=_cached_tokens(chunk.usage),
                    )
                for choice in chunk.choices:
                    delta = choice.delta
                    content = delta.content if delta is not None else None
                    if mode == "tools":
                        stray.append(content or "")
                        text = tool_arguments(delta) if delta is not None else ""
                    else:
                        text = content
                    if text:
                        if first_at is None:
                            first_at = time.perf_counter()
                        parts.append(text)
                        yield CompletionChunk(delta=text)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
        finally:
            await response.close()
        if not parts and "".join(stray):
            # a server that took the tool but answered in content: that content is the answer
            first_at = first_at or time.perf_counter()
            parts.append("".join(stray))
            yield CompletionChunk(delta=parts[0])
        end = time.perf_counter()
        ttft = (first_at or end) - start
        yield CompletionChunk(
            completion=Completion(
                text="".join(parts),
                finish_reason="length" if finish == "length" else "stop",
                usage=usage,
                ttft_s=ttft,
                decode_s=end - (first_at or end),
            )
        )

    # -- sending the constraint the server takes -------------------------------------------

    async def _open(self, model: str, messages: list[ChatMessage], json_schema: dict[str, Any] | None,
                    params: GenerationParams) -> tuple[Any, str | None]:
        """Start the streamed request; returns (the stream, the constraint mode it was sent with)."""
        mode = None if json_schema is None else self.constrain_mode
        if json_schema is None or mode is not None:
            return await self.client.chat.completions.create(
                **self._request(model, messages, json_schema, params, mode)), mode
        # "auto" before detection: one request probes while concurrent first requests wait
        # for its answer's headers, then use what it found
        self._bind_loop()
        async with self._detect_lock:
            if self.constrain_mode is None:
                return await self._detect(model, messages, json_schema, params)
        return await self._open(model, messages, json_schema, params)

    async def _detect(self, model: str, messages: list[ChatMessage], json_schema: dict[str, Any],
                      params: GenerationParams) -> tuple[Any, str]:
        """Send this request with each mode in turn until the server accepts one; remember it."""
        import openai

        refusals: list[tuple[str, openai.APIStatusError]] = []
        for mode in MODES:
            try:
                response = await self._probe(self._request(model, messages, json_schema, params, mode))
            except openai.APIStatusError as exc:
                if not rejects_format(exc):
                    raise
                log.debug("%s refused constrain=%s: %s", self.base_url, mode, short_reason(exc))
                refusals.append((mode, exc))
                continue
            self.constrain_mode = mode
            log.info("RemoteLLM(%s): the server takes constrain=%s", self.base_url, mode)
            return response, mode
        errors = [exc for _, exc in refusals]
        if len({(e.status_code, str(e)) for e in errors}) == 1 and not about_format(errors[0]):
            raise errors[0]  # the same error whatever the format (an over-long prompt...): not about formats
        reasons = "; ".join(f"{mode}: {short_reason(exc)}" for mode, exc in refusals)
        raise ConstraintUnsupportedError(
            f"the server at {self.base_url} cannot constrain output to a JSON Schema (tried json_schema, "
            f"json_object+schema, tools: {reasons}); pass constrain='none' to run unconstrained "
            "(tool calls may then be invalid)") from errors[-1]

    async def _probe(self, kwargs: dict[str, Any]) -> Any:
        """One request without the client's retries (a refusal needs no second ask); a transient
        failure is sent again through the retrying client, which backs off as it always does."""
        import openai

        try:
            return await self.client.with_options(max_retries=0).chat.completions.create(**kwargs)
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            transient = isinstance(exc, openai.APIConnectionError) or exc.status_code in _TRANSIENT_STATUSES
            if not transient or self.client.max_retries == 0:
                raise
            return await self.client.chat.completions.create(**kwargs)
