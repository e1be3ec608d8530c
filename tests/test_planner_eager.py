"""Tools that start while the model decodes: a call runs as soon as its JSON closes, its event comes out
then, opted-out tools and repeats wait for the turn, and early calls of an unusable or stopped turn are
cancelled and reported."""
from __future__ import annotations

import anyio

from agentrt.planner import Agent
from agentrt.registry import ToolRegistry
from agentrt.testing import ScriptedLLM

TWO_CALLS = {"calls": [{"tool": "fetch", "arguments": {"key": "a"}}, {"tool": "fetch", "arguments": {"key": "b"}}]}


def streaming(replies, chunk_delay_s=0.01):
    """A scripted model that writes 4 characters per chunk, ``chunk_delay_s`` apart."""
    return ScriptedLLM(replies, chunk_chars=4, chunk_delay_s=chunk_delay_s)


def tools(llm: ScriptedLLM, log: list, *, eager: bool = True, sleep_s: float = 0.05) -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool(eager=eager)
    async def fetch(key: str) -> str:
        """Fetch a value by key."""
        log.append(("start", key, llm.finished))  # llm.finished: turns the model had completed by now
        await anyio.sleep(sleep_s)
        log.append(("end", key))
        return key.upper()

    return reg


async def test_a_call_starts_while_the_model_writes_the_next_one():
    llm, log = streaming([TWO_CALLS, {"answer": "AB"}]), []
    events = [e async for e in Agent(llm, tools(llm, log)).astream("go")]
    assert ("start", "a", 0) in log  # started before the model finished its turn
    kinds = [e.type for e in events]
    # the first call's event came while the model was still writing (before the second call's)
    assert kinds[:3] == ["step_started", "tool_call", "tool_call"]
    result = events[-1].result
    step = result.steps[0]
    assert result.status == "completed" and [r.content for r in step.results] == ["A", "B"]
    assert [c.id for c in step.calls] == [e.call.id for e in events if e.type == "tool_call"]
    assert [r.call_id for r in step.results] == [c.id for c in step.calls]
    assert step.tool_time_hidden_s > 0
    assert result.messages[1].tool_calls == step.calls  # the transcript names the calls that ran


async def test_opted_out_tools_and_agents_wait_for_the_whole_turn():
    for eager_tool, eager_agent in ((False, True), (True, False)):
        llm, log = streaming([TWO_CALLS, {"answer": "AB"}]), []
        result = await Agent(llm, tools(llm, log, eager=eager_tool), eager_tools=eager_agent).run("go")
        assert result.status == "completed"
        assert all(entry[2] == 1 for entry in log if entry[0] == "start")  # after the turn was complete
        assert result.steps[0].tool_time_hidden_s == 0


async def test_a_repeated_call_is_not_started_early():
    first = {"calls": [{"tool": "fetch", "arguments": {"key": "a"}}]}
    llm, log = streaming([first, first, {"answer": "A"}]), []
    result = await Agent(llm, tools(llm, log)).run("go")
    assert [e[:2] for e in log if e[0] == "start"] == [("start", "a")]  # the repeat never ran
    assert result.steps[1].error and "repeated" in result.steps[1].error


async def test_early_calls_of_an_unusable_turn_are_cancelled_and_reported():
    # one call per turn allowed; a model the grammar does not hold (a remote one, say) writes two
    llm, log = streaming([TWO_CALLS, {"answer": "none"}]), []
    events = [e async for e in Agent(llm, tools(llm, log, sleep_s=5), parallel_tool_calls=False).astream("go")]
    step = events[-1].result.steps[0]
    assert step.error and "only one call" in step.error
    assert [c.arguments["key"] for c in step.calls] == ["a", "b"]  # both had closed: both had started
    assert all(r.is_error and r.content.startswith("Cancelled:") for r in step.results)
    assert not [e for e in log if e[0] == "end"]  # stopped, not finished
    reported = [e for e in events if e.type == "tool_result"]
    assert reported and reported[0].result.call_id == step.calls[0].id
    assert events[-1].result.status == "completed"  # the run went on with the next turn


async def test_a_cancelled_run_cancels_its_early_calls():
    cancel = anyio.Event()
    llm, log = streaming([TWO_CALLS], chunk_delay_s=0.05), []
    agent = Agent(llm, tools(llm, log, sleep_s=5))
    async for event in agent.astream("go", cancel=cancel):
        if event.type == "tool_call":
            cancel.set()
        if event.type == "run_finished":
            result = event.result
    assert result.status == "cancelled" and "cancelled tool calls already started: fetch" in result.error
    assert ("end", "a") not in log


async def test_an_abandoned_run_cancels_its_early_calls():
    llm, log = streaming([TWO_CALLS], chunk_delay_s=0.05), []
    agent = Agent(llm, tools(llm, log, sleep_s=0.3))
    async with anyio.create_task_group():
        stream = agent.astream("go")
        async for event in stream:
            if event.type == "tool_call":
                await anyio.sleep(0.05)  # the call is under way
                break
        await stream.aclose()
    await anyio.sleep(0.5)
    assert ("start", "a", 0) in log and ("end", "a") not in log
    assert llm.closed_early == 1  # the generation was aborted too
