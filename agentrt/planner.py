"""The planner loop: `Agent.run()` / `Agent.astream()`.

Each step the model (any `agentrt.llm.LLM`) sees the transcript rendered by
`agentrt.prompting` and a JSON Schema allowing either tool calls or the final answer.
Calls run concurrently through the `ToolRegistry`; results go back into the transcript
(append-only, so the next prompt extends this one and the prefix cache serves it). The
loop ends at the final answer, at ``max_steps``, at a budget (run time, total tokens),
on cancellation, or after too many unusable turns in a row. Every step is recorded.
"""
from __future__ import annotations

import contextlib
import functools
import math
import secrets
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Iterable

import anyio
from pydantic import BaseModel, ValidationError

from agentrt.llm import LLM, Completion, GenerationParams
from agentrt.prompting import PromptPlan, TurnOutput, compact_json, parse_turn, plan_turn
from agentrt.registry import RunContext, Tool, ToolRegistry
from agentrt.step_tools import StepTools
from agentrt.stream_parser import ToolCallStreamParser
from agentrt.tracing import RunTrace
from agentrt.types import (
    AgentEvent,
    FinalAnswer,
    Message,
    RunFinished,
    RunResult,
    RunStatus,
    Step,
    StepFinished,
    StepStarted,
    ToolCall,
    ToolCallEvent,
    ToolChoice,
    ToolResult,
    ToolResultEvent,
    Usage,
)

DEFAULT_PARAMS = GenerationParams(max_tokens=256)
RETRY_HINT = "Reply again with JSON in the format described above."


class _Stop(Exception):
    """Internal: end the run with ``status`` (raised from inside a step)."""

    def __init__(self, status: RunStatus, error: str | None = None):
        super().__init__(error or status)
        self.status = status
        self.error = error
        self.error_type = status  # what a trace records as error.type


class Agent:
    """A tool-using agent over any `LLM`.

    Args:
        llm: the model (e.g. ``agentrt.llm.LocalLLM()``, or ``ScriptedLLM`` in tests).
        tools: a ``ToolRegistry`` or a list of functions / ``Tool`` objects.
        system_prompt: extra instructions, after the tool list in the system message.
        tool_choice: "auto" (call tools or answer), "required" (call at least one tool),
            "none" (answer without tools) or a tool name (call that tool). "required" and a
            named tool apply until the first tool call, then the loop switches to "auto"
            (``reset_tool_choice=False`` keeps them; the run then ends at ``max_steps``).
            "answer" asks for the final answer while still showing the tools. A callable
            ``step -> choice`` (steps count from 1) schedules the choice per step.
        parallel_tool_calls: let one turn call several tools (they run concurrently).
        max_steps: the most model turns in a run.
        output_type: a pydantic model the final answer must validate into.
        deps: passed to tools that take a ``RunContext`` parameter.
        run_timeout_s: a wall-clock budget for the whole run.
        tool_timeout_s: a limit per tool call (a tool's own shorter limit still applies).
        max_total_tokens: a budget of prompt + completion tokens summed over the steps.
        params: generation settings of each turn (default greedy, 256 new tokens).
        max_retries: consecutive unusable turns (unparsable, invalid answer) tolerated;
            each is fed back to the model with the error.
        repeat_guard: when every call of a turn repeats an earlier call (same tool, same
            arguments), don't run it again: tell the model so and ask for the final answer
            in the next step (small models otherwise loop on the same call).
        name: the agent's name in traces (``invoke_agent {name}``, see `agentrt.tracing`).
        eager_tools: hand each tool call to its tool the moment the model has written it (its
            JSON object closed under the grammar), while the model writes the turn's next call;
            its `ToolCallEvent` comes at that moment. Tools made with ``eager=False`` (side
            effects) and calls that repeat an earlier one wait for the complete turn; early calls
            of a turn that ends unusable are cancelled and reported. ``Step.tool_time_hidden_s``
            says how much tool time ran behind decoding.
    """

    def __init__(
        self,
        llm: LLM,
        tools: ToolRegistry | Iterable[Tool | Callable[..., Any]] = (),
        *,
        system_prompt: str | None = None,
        tool_choice: ToolChoice | Callable[[int], ToolChoice] = "auto",
        parallel_tool_calls: bool = True,
        max_steps: int = 8,
        output_type: type[BaseModel] | None = None,
        deps: Any = None,
        run_timeout_s: float | None = None,
        tool_timeout_s: float | None = None,
        max_total_tokens: int | None = None,
        params: GenerationParams | None = None,
        max_retries: int = 2,
        reset_tool_choice: bool = True,
        repeat_guard: bool = True,
        name: str = "agent",
        eager_tools: bool = True,
    ):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if output_type is not None and not (isinstance(output_type, type) and issubclass(output_type, BaseModel)):
            raise TypeError(f"output_type must be a pydantic BaseModel subclass, got {output_type!r}")
        self.llm = llm
        self.registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(list(tools))
        self.system_prompt = system_prompt
        self.tool_choice = tool_choice
        self.parallel_tool_calls = parallel_tool_calls
        self.max_steps = max_steps
        self.output_type = output_type
        self.output_schema = output_type.model_json_schema() if output_type is not None else None
        self.deps = deps
        self.run_timeout_s = run_timeout_s
        self.tool_timeout_s = tool_timeout_s
        self.max_total_tokens = max_total_tokens
        self.params = params or DEFAULT_PARAMS
        self.max_retries = max_retries
        self.reset_tool_choice = reset_tool_choice
        self.repeat_guard = repeat_guard
        self.name = name
        self.eager_tools = eager_tools
        if not callable(tool_choice):  # validate now rather than at the first step
            plan_turn([], self.registry.specs(), tool_choice, parallel_tool_calls, self.output_schema)

    # ------------------------------------------------------------------ public API

    async def run(self, task: str | list[Message], *, cancel: anyio.Event | None = None) -> RunResult:
        """Run the loop to its end and return the result (see `astream` for the events)."""
        result: RunResult | None = None
        async for event in self.astream(task, cancel=cancel):
            if isinstance(event, RunFinished):
                result = event.result
        assert result is not None
        return result

    def run_sync(self, task: str | list[Message]) -> RunResult:
        """`run` from synchronous code (starts an event loop; not from inside one)."""
        return anyio.run(self.run, task)

    async def astream(
        self, task: str | list[Message], *, cancel: anyio.Event | None = None
    ) -> AsyncIterator[AgentEvent]:
        """Run the loop, yielding events as they happen; the last is always `RunFinished`.

        Setting ``cancel`` ends the run with status "cancelled" (the current generation and
        tool calls are abandoned). Closing the iterator early abandons the run.
        """
        run = _Run(self, task, cancel)
        async with aclosing(run.events()) as events:  # closing this iterator closes the run's now, not at GC
            async for event in events:
                yield event


class _Run:
    """The state of one run; `events()` drives it."""

    def __init__(self, agent: Agent, task: str | list[Message], cancel: anyio.Event | None):
        self.agent = agent
        self.run_id = "run_" + secrets.token_hex(8)
        self.cancel = cancel
        self.started = time.perf_counter()
        self.deadline = math.inf if agent.run_timeout_s is None else self.started + agent.run_timeout_s
        self.messages = self._initial_messages(task)
        self.steps: list[Step] = []
        self.usage = Usage()
        self.tool_choice = agent.tool_choice
        self.failures = 0  # consecutive unusable turns
        self.seen_calls: set[tuple[str, str]] = set()
        self.next_choice: ToolChoice | None = None  # a one-step override (repeat guard)
        self.trace = RunTrace(agent.name, self.run_id, getattr(agent.llm, "model_name", ""), agent.max_steps)
        self.step_tools: StepTools | None = None  # the current step's (cancelled if the run stops mid-step)

    def _initial_messages(self, task: str | list[Message]) -> list[Message]:
        if isinstance(task, str):
            if not task.strip():
                raise ValueError("the task is empty: pass a question or a list of messages")
            msgs = [Message(role="user", content=task)]
        else:
            msgs = [m if isinstance(m, Message) else Message.model_validate(m) for m in task]
            if not msgs:
                raise ValueError("the task has no messages")
        if self.agent.system_prompt:
            msgs = [Message(role="system", content=self.agent.system_prompt), *msgs]
        return msgs

    def _finish(self, status: RunStatus, answer: Any = None, error: str | None = None) -> RunFinished:
        result = RunResult(
            run_id=self.run_id,
            status=status,
            answer=answer,
            error=error,
            steps=self.steps,
            messages=self.messages,
            usage=self.usage,
            duration_s=time.perf_counter() - self.started,
        )
        self.trace.finish(result)
        return RunFinished(run_id=self.run_id, result=result)

    async def _guarded(self, fn: Callable[[], Any], what: str) -> Any:
        """Await ``fn()`` within the run's deadline and cancel event; raise _Stop when cut."""
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            raise _Stop("budget_exceeded", f"run timed out after {self.agent.run_timeout_s:g} s")
        box: list[Any] = []
        errors: list[Exception] = []

        async def work() -> None:
            try:
                box.append(await fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group (no ExceptionGroup)
                errors.append(exc)

        async def watch_cancel(scope: anyio.CancelScope) -> None:
            assert self.cancel is not None
            await self.cancel.wait()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            with anyio.move_on_after(remaining) as scope:
                if self.cancel is not None:
                    tg.start_soon(watch_cancel, scope)
                await work()
            tg.cancel_scope.cancel()  # stop the watcher, whatever happened
        if errors:
            raise errors[0]
        if self.cancel is not None and self.cancel.is_set():
            raise _Stop("cancelled", f"cancelled during {what}")
        if not box:
            raise _Stop("budget_exceeded", f"run timed out after {self.agent.run_timeout_s:g} s during {what}")
        return box[0]

    def _params(self) -> GenerationParams:
        params = self.agent.params
        update: dict[str, Any] = {}
        if params.priority is None:
            # every step of the run queues as if it arrived when the run started: a run that is
            # under way is not postponed by work that came after it (see engine.scheduler)
            update["priority"] = self.started
        if params.prompt_cache_key is None:
            # the local engine keeps each step's KV pinned for the next step while the tools run
            update["prompt_cache_key"] = self.run_id
        budget = self.agent.max_total_tokens
        if budget is not None:
            used = self.usage.prompt_tokens + self.usage.completion_tokens
            left = budget - used
            if left <= 0:
                raise _Stop("budget_exceeded", f"token budget of {budget} used up ({used} tokens)")
            update["max_tokens"] = min(params.max_tokens, left)
        return params.model_copy(update=update) if update else params

    async def events(self) -> AsyncIterator[AgentEvent]:
        """The run, step by step: plan the turn, call the model, read the turn, then feed back an
        unusable turn, refuse a repeated call, run the tools, or finish with the answer."""
        try:
            for index in range(1, self.agent.max_steps + 1):
                plan, params = self._plan_step(index)
                yield StepStarted(run_id=self.run_id, step=index)
                self.trace.start_step(index)
                t0 = time.perf_counter()
                tools = self.step_tools = StepTools(functools.partial(self._call_tool, index),
                                                    eager=self.agent.eager_tools and plan.mode == "tools")
                completion: Completion | None = None
                async for item in self._call_model(plan, params, index, tools):
                    if isinstance(item, Completion):
                        completion = item
                    else:
                        yield item
                assert completion is not None
                step = self._record_step(index, completion)
                turn, error = self._read_turn(completion, plan)
                if error is not None:
                    for event in self._cancel_early_calls(step, tools, error):
                        yield event
                    yield self._retry(step, completion.text, error, t0)
                    if self.failures > self.agent.max_retries:
                        raise _Stop("error", f"{self.failures} unusable replies in a row; last: {error}")
                elif turn.tool_calls and self._is_repeat(turn):
                    yield self._refuse_repeat(step, turn, completion.text, t0)
                elif turn.tool_calls:
                    async for event in self._run_tools(step, turn, completion.text, t0, tools):
                        yield event
                else:
                    for event in self._answer(step, turn, completion.text, plan, t0):
                        yield event
                    return
            yield self._finish("max_steps", error=f"no final answer within max_steps={self.agent.max_steps}")
        except _Stop as stop:
            error = stop.error
            cancelled = self.step_tools.cancel() if self.step_tools is not None else []
            if cancelled:
                error = f"{error} (cancelled tool calls already started: {', '.join(c.name for c in cancelled)})"
            yield self._finish(stop.status, error=error)
        finally:
            if self.step_tools is not None:  # a run abandoned mid-step: its early calls stop with it
                self.step_tools.cancel()
            release = getattr(self.agent.llm, "release_prompt_cache", None)
            if release is not None:  # no next step will reuse the run's pinned KV
                release(self.run_id)
            self.trace.close()  # a run abandoned mid-way (the consumer left) still ends its spans

    def _plan_step(self, index: int) -> tuple[PromptPlan, GenerationParams]:
        """The turn's plan (the tool choice of this step) and sampling settings."""
        if self.cancel is not None and self.cancel.is_set():
            raise _Stop("cancelled", "cancelled before step %d" % index)
        params = self._params()
        choice = self.tool_choice(index) if callable(self.tool_choice) else self.tool_choice
        if self.next_choice is not None:
            choice, self.next_choice = self.next_choice, None
        agent = self.agent
        return plan_turn(self.messages, agent.registry.specs(), choice, agent.parallel_tool_calls,
                         agent.output_schema), params

    async def _call_model(self, plan: PromptPlan, params: GenerationParams, index: int,
                          tools: StepTools) -> AsyncIterator[ToolCallEvent | Completion]:
        """Stream the model's turn; the last item is its `Completion`. In a tools turn with eager tools,
        each call that may start early goes to ``tools`` as soon as its JSON closes, and its event
        comes out then."""
        parser = ToolCallStreamParser("tools") if tools.eager else None
        stream = self.agent.llm.stream(plan.chat_messages, json_schema=plan.json_schema, params=params)
        completion: Completion | None = None
        # the chat span outlives this generator's yields: it is not made current (see agentrt.tracing)
        with self.trace.model_call(params, plan.json_schema, current=False) as traced:
            # leaving early (a stop, an abandoned run) closes the stream, which aborts the generation
            async with aclosing(stream) if hasattr(stream, "aclose") else contextlib.nullcontext():
                while completion is None:
                    with traced.active():  # what the model call does below (an HTTP request) joins the span
                        chunk = await self._next_chunk(stream, index)
                    if parser is not None and chunk.delta:
                        try:
                            parser.feed(chunk.delta)
                        except ValueError:  # not the format (an unconstrained model): the turn's end says why
                            parser = None
                            continue
                        for i, call in parser.take_finished_calls():
                            if self._may_start_early(call):
                                tools.start_early(i, call)
                                yield ToolCallEvent(run_id=self.run_id, step=index, call=call)
                    completion = chunk.completion
            traced.completion(completion)
        yield completion

    async def _next_chunk(self, stream: AsyncIterator[Any], index: int) -> Any:
        """The model stream's next chunk, within the run's deadline and cancel event."""
        try:
            return await self._guarded(lambda: anext(stream), f"step {index}")
        except _Stop:
            raise
        except StopAsyncIteration:
            raise _Stop("error", f"the model stream of step {index} ended without a completion") from None
        except Exception as exc:  # the model failed (bad schema, engine error): end the run, say why
            raise _Stop("error", f"the model call of step {index} failed: {type(exc).__name__}: {exc}") from exc

    def _may_start_early(self, call: ToolCall) -> bool:
        """A call may run before its turn is complete unless its tool opted out or it repeats an earlier
        call (the repeat guard may refuse the turn)."""
        registry = self.agent.registry
        if call.name in registry and not registry.get(call.name).eager:
            return False
        return not (self.agent.repeat_guard and _call_keys([call])[0] in self.seen_calls)

    def _record_step(self, index: int, completion: Completion) -> Step:
        self.usage = self.usage + completion.usage
        step = Step(
            index=index,
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.usage.prompt_tokens,
            cached_tokens=completion.usage.cached_tokens,
            completion_tokens=completion.usage.completion_tokens,
            forced_tokens=completion.forced_tokens,
            draft_tokens=completion.draft_tokens,
            closed_by_budget=completion.closed_by_budget,
            ttft_s=completion.ttft_s,
            decode_s=completion.decode_s,
        )
        self.steps.append(step)
        return step

    def _retry(self, step: Step, text: str, error: str, t0: float) -> StepFinished:
        """An unusable turn: the model reads why and tries again (the caller stops the run after
        max_retries in a row)."""
        step.error = error
        self._feed_back(text, error)
        self.failures += 1
        return self._step_finished(step, t0)

    def _is_repeat(self, turn: TurnOutput) -> bool:
        """Every call of the turn was made before with the same arguments (and the guard is on)."""
        return self.agent.repeat_guard and all(key in self.seen_calls for key in _call_keys(turn.tool_calls))

    def _refuse_repeat(self, step: Step, turn: TurnOutput, text: str, t0: float) -> StepFinished:
        """Repeated calls are not run again: the model is told so and must answer next."""
        self.failures = 0
        names = ", ".join(dict.fromkeys(c.name for c in turn.tool_calls))
        step.error = f"repeated call(s) of {names} with the same arguments: not run again"
        self.messages.append(Message(role="assistant", content=text))
        self.messages.append(Message(
            role="user",
            content=f"You already called {names} with these arguments; the results are above. "
            "Give the final answer now.",
        ))
        self.next_choice = "answer"
        return self._step_finished(step, t0)

    async def _run_tools(self, step: Step, turn: TurnOutput, text: str, t0: float,
                         tools: StepTools) -> AsyncIterator[AgentEvent]:
        """Run the turn's calls concurrently (some may have started early); their results join the transcript."""
        self.failures = 0
        calls = tools.adopt(turn.tool_calls)
        self.seen_calls.update(_call_keys(calls))
        self.messages.append(Message(role="assistant", content=text, tool_calls=calls))
        step.calls = calls
        for call in calls:
            if not tools.started_early(call):
                yield ToolCallEvent(run_id=self.run_id, step=step.index, call=call)
        t_tools = time.perf_counter()
        results = await self._guarded(lambda: tools.results(calls), "tool calls")
        step.tool_time_s = time.perf_counter() - t_tools
        step.tool_time_hidden_s = tools.hidden_s
        step.results = results
        for result in results:
            self.messages.append(Message(role="tool", content=result.content, tool_call_id=result.call_id,
                                         name=result.name, is_error=result.is_error))
            yield ToolResultEvent(run_id=self.run_id, step=step.index, result=result)
        choice = self.tool_choice
        if self.agent.reset_tool_choice and isinstance(choice, str) and choice not in ("auto", "none", "answer"):
            self.tool_choice = "auto"
        yield self._step_finished(step, t0)

    def _answer(self, step: Step, turn: TurnOutput, text: str, plan: PromptPlan, t0: float) -> list[AgentEvent]:
        """The final answer ends the run."""
        self.failures = 0
        step.answer = turn.answer
        self.messages.append(Message(role="assistant", content=text if plan.mode != "tools"
                                     else (turn.content or compact_json(turn.answer))))
        return [self._step_finished(step, t0), FinalAnswer(run_id=self.run_id, answer=turn.answer),
                self._finish("completed", turn.answer)]

    def _step_finished(self, step: Step, t0: float) -> StepFinished:
        """The step's record is complete (``t0``: when it started)."""
        step.duration_s = time.perf_counter() - t0
        self.trace.end_step(step)
        return StepFinished(run_id=self.run_id, step=step)

    def _read_turn(self, completion: Completion, plan: PromptPlan) -> tuple[TurnOutput | None, str | None]:
        """Parse the turn and validate a final answer; (turn, None) or (None, error message)."""
        try:
            turn = parse_turn(completion.text, plan)
        except ValueError as exc:
            cut = " (the reply was cut at max_tokens)" if completion.finish_reason == "length" else ""
            return None, f"{exc}{cut}"
        if turn.tool_calls or self.agent.output_type is None:
            if not turn.tool_calls and plan.mode == "tools" and not isinstance(turn.answer, str):
                return None, "the answer must be a string"
            return turn, None
        try:
            value = self.agent.output_type.model_validate(turn.answer)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in exc.errors()
            )
            return None, f"the answer does not match the required output: {problems}"
        return turn.model_copy(update={"answer": value}), None

    def _feed_back(self, text: str, error: str) -> None:
        """Append the unusable turn verbatim (append-only) and the error for the model to read."""
        self.messages.append(Message(role="assistant", content=text))
        self.messages.append(Message(role="user", content=f"Error: {error}. {RETRY_HINT}"))

    def _cancel_early_calls(self, step: Step, tools: StepTools, error: str) -> list[ToolResultEvent]:
        """An unusable turn: the calls that started early are cancelled, and reported as error results."""
        cancelled = tools.cancel()
        step.calls = cancelled
        step.results = [ToolResult(call_id=c.id, name=c.name, is_error=True,
                                   content=f"Cancelled: the turn turned out unusable ({error}) after this call "
                                   f"had started") for c in cancelled]
        return [ToolResultEvent(run_id=self.run_id, step=step.index, result=r) for r in step.results]

    async def _call_tool(self, step: int, call: ToolCall) -> ToolResult:
        """One call through the registry, with the run's context and limits, in its own span."""
        agent = self.agent
        context = RunContext(deps=agent.deps, run_id=self.run_id, step=step, messages=list(self.messages))
        with self.trace.tool_call(call) as traced:  # in the call's own task: the tool's own spans nest under it
            result = await agent.registry.call(call, context=context, timeout_s=self._tool_timeout(call))
            traced.result(result)
        return result

    def _tool_timeout(self, call: ToolCall) -> float | None:
        """The tightest of: the tool's own limit, the agent's per-tool limit, the run's time left."""
        limits = [self.agent.tool_timeout_s]
        if call.name in self.agent.registry:
            tool = self.agent.registry.get(call.name)
            limits.append(tool.timeout_s if tool.timeout_s is not None else self.agent.registry.default_timeout_s)
        limits = [x for x in limits if x is not None]
        return min(limits) if limits else None


def _call_keys(calls: list[ToolCall]) -> list[tuple[str, str]]:
    """What makes two calls the same: the tool and its arguments."""
    return [(c.name, compact_json(c.arguments)) for c in calls]
