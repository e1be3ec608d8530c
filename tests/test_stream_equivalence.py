"""Streaming equals non-streaming, differentially, on the real server.

A real uvicorn server on loopback with the embedded SmolLM2-135M (jump-forward on, as
always in the engine) answers each BFCL prompt twice through the official ``openai``
client: once non-streamed, once streamed (``stream_options.include_usage``). The stream is
reassembled the way an OpenAI client does (content concatenated; tool calls by ``index``:
the name from the first delta, argument fragments concatenated) and must equal the
non-streamed message field by field: content, the number of tool calls and each call's
name and arguments text (ids are made per response), finish_reason, and usage's
prompt/completion tokens.

Cases: the first 40 of ``bfcl/simple.jsonl`` and the first 10 of ``bfcl/irrelevance.jsonl``,
``max_tokens`` 96; every third with ``tool_choice="required"`` (else ``"auto"``), every fifth
sampled (temperature 0.7 with a fixed ``seed``: the same seed must give the same sample), and
every other pair sent streamed first, so neither order is privileged.

Prefix cache: the pair runs back to back, so the first request computes its prompt fresh and the
second finds it cached (``cached_tokens`` differs, so it is not compared): answers must not depend on it.
They do not because every row is computed with the same arithmetic whichever kernel takes it (a prefill
chunk of any size, or a row alone after a cache hit leaves one token): see
`test_a_prefix_cache_hit_computes_like_a_fresh_prefill` here and `tests/test_fused_prefill.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from agentrt.server import create_app
from tests.helpers.server import live_server

pytestmark = pytest.mark.e2e

BFCL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bfcl"
MAX_TOKENS = 96


def bfcl_cases() -> list[dict[str, Any]]:
    """The deterministic subset: the first 40 simple cases, then the first 10 irrelevance ones."""
    cases: list[dict[str, Any]] = []
    for name, n in (("simple.jsonl", 40), ("irrelevance.jsonl", 10)):
        with (BFCL / name).open() as f:
            lines = [line for line in f if line.strip()][:n]
        cases += [json.loads(line) for line in lines]
    return cases


def request_of(i: int, case: dict[str, Any]) -> dict[str, Any]:
    """The i-th case's request: its question and tools; tool_choice and sampling vary with i."""
    # OpenAI's names allow no dots ("math.factorial"): BFCL's own OpenAI handler writes them as "_"
    tools = [{**t, "function": {**t["function"], "name": t["function"]["name"].replace(".", "_")}}
             for t in case["tools_openai"]]
    req: dict[str, Any] = {"model": "any", "messages": case["question"][0], "tools": tools,
                           "tool_choice": "required" if i % 3 == 2 else "auto", "max_tokens": MAX_TOKENS}
    if i % 5 == 4:
        req.update(temperature=0.7, seed=1000 + i)
    return req


@dataclass
class Answer:
    """One response reduced to what must be equal, plus cached_tokens (for the diagnosis)."""

    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments text), in order
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = field(default=None, compare=False)
    n_chunks: int = field(default=0, compare=False)


def cached_of(usage: Any) -> int | None:
    details = getattr(usage, "prompt_tokens_details", None)
    return None if details is None else details.cached_tokens


def plain(client: openai.OpenAI, req: dict[str, Any]) -> Answer:
    r = client.chat.completions.create(**req)
    choice = r.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return Answer(choice.message.content or None, calls, choice.finish_reason, r.usage.prompt_tokens,
                  r.usage.completion_tokens, cached_of(r.usage))


def streamed(client: openai.OpenAI, req: dict[str, Any]) -> Answer:
    """The stream reassembled as an OpenAI client does."""
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish, usage, n = None, None, 0
    for chunk in client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True}):
        n += 1
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            delta = choice.delta
            if delta.content:  # the first chunk's "" (with the role) is no content
                content.append(delta.content)
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "args": ""})
                if tc.function and tc.function.name and not slot["name"]:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["args"] += tc.function.arguments
    assert usage is not None, "include_usage: the stream's last chunk carries the usage"
    return Answer("".join(content) or None,
                  [(calls[i]["name"], calls[i]["args"]) for i in sorted(calls)], finish,
                  usage.prompt_tokens, usage.completion_tokens, cached_of(usage), n)


def run_pair(client: openai.OpenAI, i: int, case: dict[str, Any]) -> tuple[Answer, Answer]:
    """(non-streamed, streamed) answers of case i; odd i sends the streamed one first."""
    req = request_of(i, case)
    if i % 2:
        s = streamed(client, req)
        return plain(client, req), s
    p = plain(client, req)
    return p, streamed(client, req)


def first_difference(a: str | None, b: str | None) -> int | None:
    a, b = a or "", b or ""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def describe(i: int, case: dict[str, Any], p: Answer, s: Answer) -> str:
    req = request_of(i, case)
    lines = [f"#{i} {case['id']} tool_choice={req['tool_choice']} seed={req.get('seed')} "
             f"{'streamed first' if i % 2 else 'plain first'}; cached_tokens plain={p.cached_tokens} "
             f"streamed={s.cached_tokens}"]
    for name in ("content", "calls", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"):
        x, y = getattr(p, name), getattr(s, name)
        if x != y:
            where = first_difference(str(x), str(y))
            lines.append(f"  {name}: plain={x!r}\n  {' ' * len(name)}  streamed={y!r} (first difference at char {where})")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def server():
    if not BFCL.is_dir():
        pytest.skip(f"BFCL data not found at {BFCL} (../shared/data/bfcl)")
    app = create_app(llm=None)
    with live_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=300)


def test_streamed_completions_reassemble_to_the_non_streamed_ones(client):
    cases = bfcl_cases()
    assert len(cases) == 50
    mismatches, kinds = [], {"tool_calls": 0, "stop": 0, "length": 0}
    for i, case in enumerate(cases):
        p, s = run_pair(client, i, case)
        kinds[p.finish_reason] = kinds.get(p.finish_reason, 0) + 1
        assert s.n_chunks > 2, "the streamed answer came in several chunks"
        if p != s:
            mismatches.append(describe(i, case, p, s))
    # the subset exercises all three endings, tool calls above all
    assert kinds["tool_calls"] >= 10 and kinds["stop"] + kinds["length"] >= 1, kinds
    assert not mismatches, f"{len(mismatches)} of {len(cases)} pairs differ:\n" + "\n".join(mismatches)


def test_a_prefix_cache_hit_computes_like_a_fresh_prefill(server):
    """simple_python_9's prompt: logits of its last token prefilled in one chunk vs computed alone after
    the rest (what the server does after a prefix-cache hit) are bit-identical."""
    from agentrt.server.chat_request import checked_request
    from agentrt.server.request_models import ChatCompletionRequest

    llm = server[0].state.agentrt.llm
    _, prompt, _ = checked_request(llm, ChatCompletionRequest(**request_of(9, bfcl_cases()[9])))
    ids = list(prompt.token_ids)
    engine = llm.sync_engine  # the server is idle: nothing else steps the engine
    fresh = engine.prompt_logits(ids, chunk_size=len(ids))[-1]
    after_hit = engine.prompt_logits(ids, chunk_size=[len(ids) - 1, 1])[-1]
    assert torch.equal(fresh, after_hit), float((fresh - after_hit).abs().max())
