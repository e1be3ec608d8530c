"""End to end on the embedded SmolLM2-135M: prompts extend token by token, and an agent
calls the calculator and the clock (valid calls, grammar-constrained) before answering."""
from __future__ import annotations

import json
import time

import jsonschema
import pytest

from agentrt.prompting import plan_turn
from agentrt.types import Message, ToolCall

pytestmark = pytest.mark.e2e
BLOCK = 16  # the engine's default KV block size (the prefix cache reuses partial blocks too)


@pytest.fixture(scope="module")
def llm():
    import torch

    from agentrt.llm import LocalLLM

    torch.set_num_threads(2)
    model = LocalLLM(block_size=BLOCK)
    yield model
    model.engine.shutdown()


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    from agentrt.tools import builtin_registry

    return builtin_registry(tmp_path_factory.mktemp("files")).subset(
        ["calculate", "current_time", "convert_units", "weekday"]
    )


def test_prompt_tokens_of_each_step_extend_the_previous_step(llm, tools):
    specs = tools.specs()
    raw = '{"calls":[{"tool":"calculate","arguments":{"expression":"23.50*19"}}]}'
    call = ToolCall(id="call_1", name="calculate", arguments={"expression": "23.50*19"})
    transcripts = [
        [Message(role="user", content="What is 23.5*19 and the time in UTC?")],
    ]
    transcripts.append([
        *transcripts[0],
        Message(role="assistant", content=raw, tool_calls=[call]),
        Message(role="tool", tool_call_id="call_1", name="calculate", content="446.5"),
    ])
    transcripts.append([
        *transcripts[1],
        Message(role="assistant", content='{"calls":[{"tool":"current_time","arguments":{"timezone":"UTC"}}]}',
                tool_calls=[ToolCall(id="call_2", name="current_time", arguments={"timezone": "UTC"})]),
        Message(role="tool", tool_call_id="call_2", name="current_time", content='{"time":"12:00"}'),
    ])
    # any tool_choice per step: the rendering (and so the tokens) must not depend on it
    choices = ["required", "auto", "answer"]
    ids = [llm.prepare_prompt(plan_turn(t, specs, c).chat_messages).token_ids for t, c in zip(transcripts, choices)]
    for prev, cur in zip(ids, ids[1:]):
        assert len(cur) > len(prev) and cur[: len(prev)] == prev
    # the assistant's JSON is in the next prompt verbatim (the number kept as "23.50")
    assert raw in llm.tokenizer.decode(ids[1])


def test_agent_calls_calculator_and_clock_before_answering(llm, tools):
    from agentrt.llm import GenerationParams
    from agentrt.planner import Agent

    agent = Agent(
        llm,
        tools,
        tool_choice="required",  # the first step must call tools; then the model decides
        parallel_tool_calls=True,
        max_steps=5,
        params=GenerationParams(max_tokens=96),
    )
    result = agent.run_sync(
        "Use the calculate tool to compute 23*19. Then use the current_time tool to get the time in UTC. "
        "Then answer with both results."
    )
    trace = json.dumps([s.model_dump(exclude={"results"}) for s in result.steps], default=str)[:3000]
    assert result.status == "completed", trace
    calls = [c for s in result.steps for c in s.calls]
    names = [c.name for c in calls]
    assert "calculate" in names and "current_time" in names, trace
    specs = {s.name: s.parameters for s in tools.specs()}
    for step in result.steps:
        for c, r in zip(step.calls, step.results):
            jsonschema.validate(c.arguments, specs[c.name])  # every call valid against its schema
            assert not r.is_error, (c, r)
    calc = next(r for s in result.steps for c, r in zip(s.calls, s.results) if c.name == "calculate")
    assert calc.content == "437"
    # the answer came after the calls
    assert result.steps[-1].answer is not None and not result.steps[-1].calls
    # append-only prompts: each step is served from the prefix cache every token of the previous
    # step, its prompt and all it generated (the finished tail's K/V is computed after the output)
    for prev, step in zip(result.steps, result.steps[1:]):
        assert step.cached_tokens >= prev.prompt_tokens + prev.completion_tokens, trace
    assert sum(s.forced_tokens for s in result.steps) > 0  # jump-forward did the JSON structure


def test_every_step_is_served_all_of_the_previous_step_from_the_cache(llm, tools):
    # the criterion on a scheduled 4-step run (3 calls, then the answer): for every
    # step n >= 2, cached_tokens[n] >= prompt_tokens[n-1] + completion_tokens[n-1]
    from agentrt.llm import GenerationParams
    from agentrt.planner import Agent

    plan = ["calculate", "convert_units", "weekday"]
    agent = Agent(llm, tools, tool_choice=lambda i: plan[i - 1] if i <= len(plan) else "answer",
                  parallel_tool_calls=False, max_steps=4, params=GenerationParams(max_tokens=64), repeat_guard=False)
    result = agent.run_sync("Compute 6*7, convert 10 km to miles, and tell the weekday of 2025-12-25.")
    trace = json.dumps([s.model_dump(exclude={"results"}) for s in result.steps], default=str)[:3000]
    assert len(result.steps) == 4, trace
    assert sum(s.forced_tokens for s in result.steps) > 0  # forced closing runs were part of the tails
    for prev, step in zip(result.steps, result.steps[1:]):
        assert step.cached_tokens >= prev.prompt_tokens + prev.completion_tokens, trace
    deadline = time.monotonic() + 30  # the engine loop computes the last step's tail right after its output
    while (llm.stats().finishing or llm.stats().running) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.stats().kv_blocks_used == 0  # once idle, nothing stays referenced


async def test_local_llm_closes_the_json_within_max_tokens(llm):
    # a long free-text field and a tiny budget: the grammar must make the model finish the value
    # in time (valid, finish_reason "stop", flagged), never hand back a cut object
    from agentrt.llm import GenerationParams

    schema = {"type": "object", "properties": {"story": {"type": "string"}, "words": {"type": "integer"}},
              "required": ["story", "words"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Write a very long story about a dragon, in JSON."}]
    out = await llm.complete(messages, json_schema=schema, params=GenerationParams(max_tokens=14))
    jsonschema.validate(json.loads(out.text), schema)
    assert out.finish_reason == "stop" and out.closed_by_budget, out
    assert out.usage.completion_tokens <= 14
    roomy = await llm.complete(messages, json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                      "required": ["ok"], "additionalProperties": False},
                               params=GenerationParams(max_tokens=64))
    assert not roomy.closed_by_budget and json.loads(roomy.text)["ok"] in (True, False)
