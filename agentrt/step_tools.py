"""`StepTools`: the tool calls of one agent step, each in its own task, started early or at the turn's end.

A call the model has finished writing can run while the model writes the turn's next call (eager);
the planner hands it over the moment the grammar closes its JSON object. The rest start once the
turn is complete and valid. `results` waits for all of them; `cancel` stops the ones that started
when the turn turns out unusable. Each call's run time is kept, so the step can say how much tool
time was hidden behind decoding.

Eager starts need tasks that outlive the planner's ``yield`` of their events, so they are asyncio
tasks (an anyio task group cannot stay open across an async generator's ``yield``); under another
event loop library nothing starts early.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from agentrt.types import ToolCall, ToolResult

RunCall = Callable[[ToolCall], Awaitable[ToolResult]]


class _Started:
    """One call in flight: its task and when it started and ended (perf_counter seconds)."""

    def __init__(self, call: ToolCall, run_call: RunCall):
        self.call = call
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(run_call))

    async def _run(self, run_call: RunCall) -> ToolResult:
        try:
            return await run_call(self.call)
        finally:
            self.ended = time.perf_counter()


class StepTools:
    """The calls of one step, run through ``run_call`` (the registry, with the run's limits)."""

    def __init__(self, run_call: RunCall, *, eager: bool):
        self._run_call = run_call
        self.eager = eager and _on_asyncio()
        self._early: dict[int, _Started] = {}  # by the call's index in the turn
        self.turn_ended: float | None = None  # when the model's turn was complete

    def start_early(self, index: int, call: ToolCall) -> None:
        """Start call ``index`` of the turn now, while the model is still writing."""
        self._early[index] = _Started(call, self._run_call)

    def adopt(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The turn's calls as parsed at its end, each replaced by the early-started call with its index
        when they agree (so ids match the events already sent); an early call that disagrees is
        cancelled (it runs again, from the turn's version)."""
        self.turn_ended = time.perf_counter()
        out = []
        for index, call in enumerate(calls):
            early = self._early.get(index)
            if early is not None and (early.call.name, early.call.arguments) == (call.name, call.arguments):
                out.append(early.call)
            else:
                if early is not None:
                    early.task.cancel()
                    del self._early[index]
                out.append(call)
        for index in [i for i in self._early if i >= len(calls)]:
            self._early.pop(index).task.cancel()
        return out

    def started_early(self, call: ToolCall) -> bool:
        return any(s.call is call for s in self._early.values())

    async def results(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Run the calls that have not started, concurrently with those that have; results in call order."""
        started = {id(s.call): s for s in self._early.values()}
        runs = [started.get(id(call)) or _Started(call, self._run_call) for call in calls]
        try:
            return list(await asyncio.gather(*(r.task for r in runs)))
        except BaseException:
            for r in runs:
                r.task.cancel()
            raise

    def cancel(self) -> list[ToolCall]:
        """Cancel the calls that started early (the turn ended unusable, or the run stopped); returns them."""
        cancelled = [s.call for s in self._early.values() if not s.task.done()]
        for started in self._early.values():
            started.task.cancel()
        self._early.clear()
        return cancelled

    @property
    def hidden_s(self) -> float:
        """Tool time that ran while the model was still decoding: summed over the calls started early."""
        end = self.turn_ended
        if end is None:
            return 0.0
        return sum(max(0.0, min(s.ended or end, end) - s.started) for s in self._early.values())


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio, say: no asyncio loop to hold the tasks
        return False
    return True
