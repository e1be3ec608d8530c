"""The planner loop on a scripted LLM: every branch of Agent.run / astream."""
from __future__ import annotations

import json
import time

import anyio
import pytest
from pydantic import BaseModel, TypeAdapter

from agentrt.planner import Agent
from agentrt.registry import RunContext, ToolRegistry
from agentrt.testing import ScriptedLLM
from agentrt.types import AgentEvent, Message, RunFinished, RunResult


def calls(*pairs) -> dict:
    return {"calls": [{"tool": name, "arguments": args} for name, args in pairs]}


def answer(value) -> dict:
    return {"answer": value}


def make_registry() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @reg.tool
    async def slow(seconds: float) -> str:
        """Sleep, then say done."""
        await anyio.sleep(seconds)
        return "done"

    @reg.tool
    def explode(reason: str) -> str:
        """Always fails."""
        raise RuntimeError(f"kaboom: {reason}")

    @reg.tool
    def whoami(ctx: RunContext[dict]) -> str:
        """Return the user name from the deps."""
        return f"{ctx.deps['user']} at step {ctx.step}"

    return reg


async def test_multi_step_run_records_every_step():
    llm = ScriptedLLM([calls(("add", {"a": 2, "b": 3})), calls(("add", {"a": 5, "b": 10})), answer("15")])
    result = await Agent(llm, make_registry()).run("What is 2+3+10?")
    assert result.status == "completed" and result.answer == "15"
    assert [s.index for s in result.steps] == [1, 2, 3]
    assert [r.content for r in result.steps[0].results] == ["5"]
    assert [r.content for r in result.steps[1].results] == ["15"]
    assert result.steps[2].answer == "15" and result.steps[2].calls == []
    # the model saw the results of step 1 in step 2's prompt
    step2_prompt = llm.calls[1][0]
    assert step2_prompt[-1] == {"role": "user", "content": "Result of add: 5"}
    assert result.usage.prompt_tokens == sum(s.prompt_tokens for s in result.steps)
    roles = [m.role for m in result.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


async def test_prompts_are_append_only_and_cached_share_grows():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1})), calls(("add", {"a": 2, "b": 2})), answer("4")])
    result = await Agent(llm, make_registry()).run("go")
    prompts = [c[0] for c in llm.calls]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later[: len(earlier)] == earlier
    for prev, step in zip(result.steps, result.steps[1:]):
        assert step.cached_tokens >= prev.prompt_tokens


async def test_parallel_calls_run_concurrently_and_keep_order():
    llm = ScriptedLLM([calls(("slow", {"seconds": 0.6}), ("add", {"a": 1, "b": 2}), ("slow", {"seconds": 0.6})), answer("ok")])
    t0 = time.perf_counter()
    result = await Agent(llm, make_registry()).run("go")
    assert time.perf_counter() - t0 < 1.1  # two 0.6 s sleeps overlapped (in turn: >= 1.2 s)
    assert [r.content for r in result.steps[0].results] == ["done", "3", "done"]
    assert [r.call_id for r in result.steps[0].results] == [c.id for c in result.steps[0].calls]
    assert result.steps[0].tool_time_s >= 0.6


async def test_parallel_off_limits_schema_and_rejects_two_calls():
    two = calls(("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4}))
    llm = ScriptedLLM([two, answer("ok")])
    result = await Agent(llm, make_registry(), parallel_tool_calls=False).run("go")
    assert llm.calls[0][1]["anyOf"][0]["properties"]["calls"]["maxItems"] == 1
    assert result.steps[0].error and "only one call" in result.steps[0].error
    assert result.status == "completed"


async def test_tool_error_is_fed_back_to_the_model():
    llm = ScriptedLLM([calls(("explode", {"reason": "x"})), answer("it failed")])
    result = await Agent(llm, make_registry()).run("go")
    res = result.steps[0].results[0]
    assert res.is_error and "kaboom: x" in res.content
    assert llm.calls[1][0][-1]["content"].startswith("Error from explode: ")
    assert result.status == "completed"


async def test_invalid_arguments_become_an_error_result():
    llm = ScriptedLLM([calls(("add", {"a": "two", "b": 3})), answer("bad")])
    result = await Agent(llm, make_registry()).run("go")
    assert result.steps[0].results[0].is_error
    assert "a" in result.steps[0].results[0].content


async def test_tool_timeout_becomes_an_error_result():
    llm = ScriptedLLM([calls(("slow", {"seconds": 5})), answer("too slow")])
    t0 = time.perf_counter()
    result = await Agent(llm, make_registry(), tool_timeout_s=0.2).run("go")
    assert time.perf_counter() - t0 < 2
    res = result.steps[0].results[0]
    assert res.is_error and "Timeout" in res.content
    assert result.status == "completed"


async def test_max_steps_ends_with_a_clear_status():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1}))] * 3)
    result = await Agent(llm, make_registry(), max_steps=3).run("go")
    assert result.status == "max_steps" and result.answer is None
    assert "max_steps=3" in result.error
    assert len(result.steps) == 3


async def test_required_choice_forces_a_call_then_resets_to_auto():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1})), answer("2")])
    result = await Agent(llm, make_registry(), tool_choice="required").run("go")
    first, second = llm.calls[0][1], llm.calls[1][1]
    assert "anyOf" not in first and "calls" in first["properties"]  # no answer shape
    assert "anyOf" in second  # back to auto
    assert result.status == "completed"


async def test_required_without_reset_never_answers():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1}))] * 2)
    result = await Agent(llm, make_registry(), tool_choice="required", reset_tool_choice=False, max_steps=2).run("go")
    assert all("anyOf" not in c[1] for c in llm.calls)
    assert result.status == "max_steps"


async def test_named_choice_allows_only_that_tool():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1})), answer("2")])
    await Agent(llm, make_registry(), tool_choice="add").run("go")
    items = llm.calls[0][1]["properties"]["calls"]["items"]
    assert items["properties"]["tool"]["const"] == "add"


async def test_named_choice_must_exist():
    with pytest.raises(ValueError, match="known tools"):
        Agent(ScriptedLLM([]), make_registry(), tool_choice="nope")


async def test_choice_none_is_free_text():
    llm = ScriptedLLM(["Just text."])
    result = await Agent(llm, make_registry(), tool_choice="none").run("hi")
    assert llm.calls[0][1] is None
    assert result.answer == "Just text." and result.status == "completed"


class Weather(BaseModel):
    city: str
    celsius: float


async def test_typed_final_answer_is_validated_into_the_output_type():
    llm = ScriptedLLM([answer({"city": "Oslo", "celsius": 3.5})])
    result = await Agent(llm, make_registry(), output_type=Weather).run("weather?")
    assert result.answer == Weather(city="Oslo", celsius=3.5)
    assert llm.calls[0][1]["anyOf"][1]["properties"]["answer"]["properties"]["celsius"]["type"] == "number"
    # JSON-serialisable for the server
    assert json.loads(result.model_dump_json())["answer"] == {"city": "Oslo", "celsius": 3.5}


async def test_typed_answer_without_tools_uses_the_schema_itself():
    llm = ScriptedLLM([{"city": "Oslo", "celsius": 1}])
    result = await Agent(llm, [], output_type=Weather).run("weather?")
    assert llm.calls[0][1] == Weather.model_json_schema()
    assert result.answer == Weather(city="Oslo", celsius=1.0)


async def test_validation_failure_is_fed_back_then_fixed():
    llm = ScriptedLLM([answer({"city": "Oslo", "celsius": "warm"}), answer({"city": "Oslo", "celsius": 20})])
    result = await Agent(llm, make_registry(), output_type=Weather).run("weather?")
    assert result.status == "completed" and result.answer.celsius == 20
    err = result.steps[0].error
    assert "celsius" in err
    fed_back = llm.calls[1][0][-1]
    assert fed_back["role"] == "user" and fed_back["content"].startswith("Error: the answer does not match")


async def test_unparsable_turns_retry_then_error():
    llm = ScriptedLLM(['{"calls":[{"tool"', "more garbage", "still garbage"])
    result = await Agent(llm, make_registry(), max_retries=2).run("go")
    assert result.status == "error"
    assert "3 unusable replies" in result.error and "not valid JSON" in result.error
    assert [m["role"] for m in llm.calls[1][0][-2:]] == ["assistant", "user"]
    assert llm.calls[1][0][-2]["content"] == '{"calls":[{"tool"'  # verbatim, append-only


async def test_unknown_tool_in_reply_is_fed_back():
    llm = ScriptedLLM([calls(("rm_rf", {})), answer("sorry")])
    result = await Agent(llm, make_registry()).run("go")
    assert "unknown tool 'rm_rf'" in result.steps[0].error
    assert result.status == "completed"


async def test_run_context_receives_deps_and_step():
    llm = ScriptedLLM([answer("x")])
    llm = ScriptedLLM([calls(("add", {"a": 0, "b": 0})), calls(("whoami", {})), answer("ada")])
    result = await Agent(llm, make_registry(), deps={"user": "ada"}).run("who?")
    assert result.steps[1].results[0].content == "ada at step 2"
    assert "ctx" not in json.dumps(llm.calls[0][1])  # the context is not in the schema


async def test_run_timeout_is_a_budget():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1}))] * 5, delay_s=0.3)
    result = await Agent(llm, make_registry(), run_timeout_s=0.5).run("go")
    assert result.status == "budget_exceeded" and "timed out" in result.error
    assert result.duration_s < 1.5


async def test_token_budget():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1}))] * 5)
    result = await Agent(llm, make_registry(), max_total_tokens=200).run("go")
    assert result.status == "budget_exceeded" and "token budget" in result.error
    assert result.usage.prompt_tokens + result.usage.completion_tokens >= 200
    assert len(result.steps) < 5


async def test_cancel_event_stops_the_run():
    cancel = anyio.Event()
    llm = ScriptedLLM([calls(("slow", {"seconds": 10}))])
    result_box: list[RunResult] = []

    async def runner():
        result_box.append(await Agent(llm, make_registry()).run("go", cancel=cancel))

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner)
        await anyio.sleep(0.2)
        cancel.set()
    assert result_box[0].status == "cancelled"


async def test_astream_event_order_and_serialisation():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})), answer("3 and 7")])
    events = [e async for e in Agent(llm, make_registry()).astream("go")]
    kinds = [e.type for e in events]
    assert kinds == [
        "step_started", "tool_call", "tool_call", "tool_result", "tool_result", "step_finished",
        "step_started", "step_finished", "final_answer", "run_finished",
    ]
    adapter = TypeAdapter(AgentEvent)
    for e in events:  # every event round-trips through JSON (the server sends them as SSE)
        assert adapter.validate_json(e.model_dump_json()) == e
    assert isinstance(events[-1], RunFinished) and events[-1].result.answer == "3 and 7"


async def test_breaking_out_of_astream_abandons_the_run():
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 2})), answer("3")])
    stream = Agent(llm, make_registry()).astream("go")
    async for event in stream:
        if event.type == "tool_call":
            break
    await stream.aclose()
    assert len(llm.calls) == 1


async def test_system_prompt_and_message_list_task():
    llm = ScriptedLLM([answer("hi")])
    task = [Message(role="user", content="hello")]
    await Agent(llm, make_registry(), system_prompt="Be terse.").run(task)
    system = llm.calls[0][0][0]
    assert system["role"] == "system" and system["content"].endswith("Be terse.")
    assert "- add(a: integer, b: integer): Add two integers." in system["content"]


def test_run_sync_and_tool_list():
    def double(x: int) -> int:
        """Double x."""
        return 2 * x

    llm = ScriptedLLM([calls(("double", {"x": 21})), answer("42")])
    result = Agent(llm, [double]).run_sync("double 21")
    assert result.steps[0].results[0].content == "42" and result.answer == "42"


def test_bad_arguments_to_agent():
    with pytest.raises(ValueError, match="max_steps"):
        Agent(ScriptedLLM([]), [], max_steps=0)
    with pytest.raises(TypeError, match="output_type"):
        Agent(ScriptedLLM([]), [], output_type=dict)
    with pytest.raises(ValueError, match="empty"):
        Agent(ScriptedLLM([]), []).run_sync("  ")


async def test_scheduled_tool_choice_per_step():
    schedule = {1: "add", 2: "whoami"}
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1})), calls(("whoami", {})), answer("done")])
    result = await Agent(llm, make_registry(), deps={"user": "x"}, tool_choice=lambda i: schedule.get(i, "answer")).run("go")
    consts = [c[1]["properties"]["calls"]["items"]["properties"]["tool"]["const"] for c in llm.calls[:2]]
    assert consts == ["add", "whoami"]
    assert "calls" not in json.dumps(llm.calls[2][1])  # answer only
    prompts = [c[0] for c in llm.calls]
    assert prompts[2][: len(prompts[1])] == prompts[1]  # still append-only
    assert result.status == "completed"


async def test_a_failing_model_call_ends_the_run_with_its_error():
    def boom(messages, schema):
        raise RuntimeError("engine on fire")

    result = await Agent(ScriptedLLM([boom]), make_registry()).run("go")
    assert result.status == "error"
    assert "RuntimeError: engine on fire" in result.error


async def test_repeated_calls_are_not_rerun_and_the_answer_is_asked_for():
    same = calls(("add", {"a": 1, "b": 1}))
    llm = ScriptedLLM([same, same, answer("2")])
    result = await Agent(llm, make_registry()).run("go")
    assert result.status == "completed" and result.answer == "2"
    assert len(result.steps[0].results) == 1 and result.steps[1].results == []
    assert "repeated call" in result.steps[1].error
    assert llm.calls[2][0][-1]["content"].endswith("Give the final answer now.")
    assert "calls" not in json.dumps(llm.calls[2][1])  # the next step may only answer
    # without the guard the repeat runs again
    llm = ScriptedLLM([same, same, answer("2")])
    result = await Agent(llm, make_registry(), repeat_guard=False).run("go")
    assert len(result.steps[1].results) == 1


async def test_every_step_of_a_run_queues_with_the_runs_start_as_priority():
    from agentrt.llm import GenerationParams

    before = time.perf_counter()
    llm = ScriptedLLM([calls(("add", {"a": 1, "b": 1})), calls(("add", {"a": 2, "b": 2})), answer("4")])
    await Agent(llm, make_registry()).run("go")
    first = ScriptedLLM([answer("x")])
    await anyio.sleep(0.01)
    await Agent(first, make_registry()).run("go")
    seen: list[GenerationParams] = [c.params for c in llm.calls + first.calls]
    priorities = [p.priority for p in seen]
    assert len(priorities) == 4 and len(set(priorities[:3])) == 1  # one value for the whole run
    assert before <= priorities[0] < priorities[3]  # a later run queues after an earlier one
    fixed = ScriptedLLM([answer("y")])
    await Agent(fixed, make_registry(), params=GenerationParams(priority=-1.0)).run("go")
    seen = [c.params for c in fixed.calls]
    assert seen[-1].priority == -1.0  # a caller's own priority is kept
