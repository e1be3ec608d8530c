"""`LocalLLM`: the engine in-process behind the `LLM` protocol (`agentrt.protocol`, re-exported here
with `RemoteLLM`, so ``from agentrt.llm import LocalLLM, RemoteLLM, GenerationParams`` works)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, AsyncIterator

import anyio

from agentrt.protocol import (LLM, BaseLLM, ChatMessage, Completion, CompletionChunk, FinishReason,
                              GenerationParams, Prompt, final_completion, prompt_messages)
from agentrt.types import Usage

# RemoteLLM comes from agentrt.remote on first use (module __getattr__ below): it needs the openai client
__all__ = ["LLM", "BaseLLM", "ChatMessage", "Completion", "CompletionChunk", "FinishReason", "GenerationParams",
           "LocalLLM", "Prompt", "final_completion"]


class LocalLLM(BaseLLM):
    """The engine in-process behind the `LLM` protocol.

    Loads a model once (None = the embedded SmolLM2-135M-Instruct; keyword overrides go to
    `EngineConfig`), renders chat messages
    with the model's own chat template, and compiles ``json_schema`` into a grammar that
    constrains decoding, so the text returned always parses and validates (unless cut by
    ``max_tokens``: then ``finish_reason == "length"``).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        config: Any = None,
        grammar_timeout_s: float = 120.0,
        **config_overrides: Any,
    ):
        from agentrt.engine import AsyncLLMEngine, EngineConfig, LLMEngine

        if config is None:
            config = EngineConfig(model=model, **config_overrides)
        elif config_overrides or model is not None:
            raise TypeError("pass either config=EngineConfig(...) or model/keyword overrides, not both")
        self.config = config
        self.sync_engine = LLMEngine(config)
        self.engine = AsyncLLMEngine(self.sync_engine)
        self.tokenizer = self.sync_engine.tokenizer
        self.model_name: str = self.sync_engine.model_name
        self._grammar_compiler: Any = None
        # A union of many tools' argument grammars indexes slowly on a cold cache (seconds per
        # tool on 2 cores); compiled grammars are then cached on disk, so only the first run pays.
        self.grammar_timeout_s = grammar_timeout_s
        self._transcripts: OrderedDict[str, list[int]] = OrderedDict()  # rendered text -> its tokens
        self._transcripts_lock = threading.Lock()
        self.max_remembered_transcripts = 256

    @property
    def grammar_compiler(self) -> Any:
        """The per-model grammar compiler (built on first use: it indexes the vocabulary)."""
        if self._grammar_compiler is None:
            from agentrt.engine.grammar import GrammarCompiler

            self._grammar_compiler = GrammarCompiler.from_tokenizer(
                self.tokenizer, vocab_size=self.sync_engine.vocab_size
            )
        return self._grammar_compiler

    @property
    def engine_summary(self) -> str:
        """Which path runs the model, e.g. "fused C++ step, int4 weights, avx2 kernels, float32, 2 threads"."""
        return self.sync_engine.describe()

    @property
    def context_window(self) -> int:
        """The engine's context length in tokens (prompt + output)."""
        return self.sync_engine.max_model_len

    def prepare_prompt(self, messages: list[ChatMessage]) -> Prompt:
        """The chat-templated prompt, ending with the assistant's generation header, and its tokens.

        When the rendered text extends an earlier prompt plus the text generated for it (the
        next agent step), that earlier part keeps the exact tokens the engine saw and sampled:
        re-tokenizing generated text can split it differently (forced runs such as `"}` vs
        `"` `}}`), which would end the prefix-cache hit a few tokens early.
        """
        text = self._render(messages)
        return Prompt(messages=list(messages), text=text, token_ids=self._encode_prompt(text))

    def prepare_schema(self, json_schema: dict[str, Any]) -> None:
        self.compile(json_schema)

    def _encode_prompt(self, text: str) -> list[int]:
        self.sync_engine.check_prompt_text(text)
        with self._transcripts_lock:  # prompts are encoded in worker threads
            key = max((k for k in self._transcripts if text.startswith(k)), key=len, default="")
            known = self._transcripts[key] if key else []
            if key:
                self._transcripts.move_to_end(key)
        return known + self.tokenizer.encode(text[len(key):], add_special_tokens=False)

    def _render(self, messages: list[ChatMessage]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _remember(self, prompt_text: str, prompt_ids: list[int], out: Any) -> None:
        """Keep prompt + generated tokens under their text, for `prepare_prompt`."""
        generated = list(out.output_token_ids)
        if generated and generated[-1] in self.sync_engine.eos_token_ids:
            generated.pop()
        # Only when the tokens spell exactly the returned text (not cut by a stop string).
        if self.tokenizer.decode(generated, skip_special_tokens=False) == out.text:
            with self._transcripts_lock:
                self._transcripts[prompt_text + out.text] = prompt_ids + generated
                while len(self._transcripts) > self.max_remembered_transcripts:
                    self._transcripts.popitem(last=False)

    def compile(self, json_schema: dict[str, Any]) -> Any:
        """Compile (or fetch from cache) the grammar of ``json_schema``; raises
        UnsupportedSchemaError naming any keyword that cannot be enforced."""
        return self.grammar_compiler.compile_json_schema(json_schema, timeout_s=self.grammar_timeout_s)

    def stats(self) -> Any:
        return self.sync_engine.stats()

    def release_prompt_cache(self, key: str) -> None:
        """Unpin the KV that generations with ``prompt_cache_key=key`` left pinned (e.g. the run ended)."""
        self.engine.release_cache_key(key)

    def close(self) -> None:
        """Stop the engine's loop thread (open streams end with finish_reason "abort"). Programs that
        never call it still exit cleanly: every engine left running is stopped at interpreter exit."""
        self.engine.shutdown()

    def __enter__(self) -> LocalLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LocalLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.close)

    async def complete(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> Completion:
        return await final_completion(self.stream(messages, json_schema=json_schema, params=params))

    async def stream(
        self,
        messages: list[ChatMessage] | Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        from agentrt.engine import SamplingParams
        from agentrt.engine.grammar import GrammarMatcher

        params = params or GenerationParams()
        prompt = messages
        if not isinstance(prompt, Prompt) or prompt.token_ids is None or prompt.text is None:
            # rendering and tokenizing grow with the transcript: off the event loop
            prompt = await anyio.to_thread.run_sync(self.prepare_prompt, prompt_messages(messages))
        constraint = None
        if json_schema is not None:
            # Compiling can take a while on a cold cache: keep the event loop free.
            grammar = await anyio.to_thread.run_sync(self.compile, json_schema)
            # max_tokens lets the matcher close the value in time (first use per grammar plans it: off the loop)
            constraint = await anyio.to_thread.run_sync(GrammarMatcher, grammar, params.max_tokens)
        sampling = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=list(params.stop),
        )
        async for out in self.engine.generate_stream(prompt.token_ids, sampling, constraint=constraint,
                                                     priority=params.priority, cache_key=params.prompt_cache_key):
            if out.delta_text:
                yield CompletionChunk(delta=out.delta_text)
            if out.finished:
                self._remember(prompt.text, prompt.token_ids, out)
                m = out.metrics
                yield CompletionChunk(
                    completion=Completion(
                        text=out.text,
                        finish_reason=out.finish_reason or "stop",
                        usage=Usage(
                            prompt_tokens=m.prompt_tokens,
                            completion_tokens=m.completion_tokens,
                            cached_tokens=m.cached_tokens,
                        ),
                        ttft_s=m.ttft_s or 0.0,  # None when no token was produced
                        decode_s=m.decode_s,
                        forced_tokens=m.forced_tokens,
                        draft_tokens=m.draft_tokens_accepted,
                        queue_s=m.queue_s,
                        closed_by_budget=out.closed_by_budget,
                    )
                )


def __getattr__(name: str) -> Any:
    # RemoteLLM lives in its own module (it needs the openai client); re-exported here.
    if name == "RemoteLLM":
        from agentrt.remote import RemoteLLM

        return RemoteLLM
    raise AttributeError(name)
