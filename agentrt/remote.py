"""`RemoteLLM`: the `LLM` protocol over any OpenAI-compatible server, for scale-out.

The planner, the tools and the prompting stay on this machine; only generation moves to
a server: vLLM, SGLang, or another ``agentrt serve``. The step's JSON Schema is sent as
``response_format={"type": "json_schema", "json_schema": {..., "strict": true}}``, which
vLLM and SGLang enforce with their own grammar backends (xgrammar / outlines) and agentrt
enforces with its grammar, so tool calls stay valid whichever server runs the model::

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
to the first content token, so it includes the network.
"""
from __future__ import annotations

import os
import time
from typing import Any, AsyncIterator
from urllib.parse import urlparse

from agentrt.protocol import (BaseLLM, ChatMessage, Completion, CompletionChunk, GenerationParams, Prompt,
                              final_completion, prompt_messages)
from agentrt.types import Usage


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
    ):
        import openai

        self.base_url = _normalise_base_url(base_url)
        self.model_name: str = model or ""
        self.schema_name = schema_name
        self.extra_body = dict(extra_body or {})
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed",
            timeout=timeout,
            max_retries=max_retries,
        )

    @property
    def engine_summary(self) -> str:
        return f"served by {self.base_url}"

    async def _model(self) -> str:
        if not self.model_name:
            models = await self.client.models.list()
            if not models.data:
                raise RuntimeError(f"the server at {self.base_url} lists no models; pass model=...")
            self.model_name = models.data[0].id
        return self.model_name

    def _request(self, model: str, messages: list[ChatMessage], json_schema: dict[str, Any] | None,
                 params: GenerationParams) -> dict[str, Any]:
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
        if json_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": self.schema_name, "schema": json_schema, "strict": True},
            }
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
        iterator early closes the HTTP stream, so the server aborts the generation."""
        params = params or GenerationParams()
        model = await self._model()
        start = time.perf_counter()
        first_at: float | None = None
        parts: list[str] = []
        finish: str | None = None
        usage = Usage()
        response = await self.client.chat.completions.create(
            **self._request(model, prompt_messages(messages), json_schema, params))
        try:
            async for chunk in response:
                if chunk.usage is not None:
                    usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens or 0,
                        completion_tokens=chunk.usage.completion_tokens or 0,
                        cached_tokens=_cached_tokens(chunk.usage),
                    )
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        if first_at is None:
                            first_at = time.perf_counter()
                        parts.append(text)
                        yield CompletionChunk(delta=text)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
        finally:
            await response.close()
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
