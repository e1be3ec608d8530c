"""The typed tool registry: ``@tool``, :class:`Tool`, :class:`ToolRegistry`, :class:`RunContext`.

A function's signature and docstring become an arguments model and a JSON Schema
(see :mod:`agentrt.schema`). Calls are validated against both before the function
runs; sync tools run in a worker thread, async ones are awaited; every failure
(unknown tool, bad arguments, an exception, a timeout) becomes a
``ToolResult(is_error=True)`` whose content the model reads, so the planner loop
never has to catch anything but cancellation.

The registry depends on neither the planner nor the engine.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import sys
import threading
import time
import weakref
from fractions import Fraction
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar, overload

import anyio
import anyio.lowlevel
import jsonschema
import pydantic
import pydantic_core
from pydantic import BaseModel

from agentrt.schema import FunctionSchema, ParamInfo, ToolDefinitionError, function_schema, name_problem
from agentrt.types import ToolCall, ToolResult, ToolSpec

__all__ = [
    "RunContext",
    "Tool",
    "ToolArgumentsError",
    "ToolDefinitionError",
    "ToolRegistry",
    "default_registry",
    "serialize_result",
    "tool",
]

DepsT = TypeVar("DepsT")
F = TypeVar("F", bound=Callable[..., Any])


# The thread limiter of the registry serving the current call (None: anyio's shared pool).
# A context variable rather than an argument, so subclasses overriding Tool.invoke keep working.
_THREAD_LIMITER: contextvars.ContextVar[anyio.CapacityLimiter | None] = contextvars.ContextVar(
    "agentrt_tool_thread_limiter", default=None)


def _exact_multiple_of(validator: Any, step: Any, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    """``multipleOf`` on the numbers as written (19.99 is a multiple of 0.01), the way JSON Schema states it
    and the grammar enforces it; jsonschema's float division says 19.99 / 0.01 is no integer."""
    if not validator.is_type(instance, "number") or isinstance(step, bool) or not isinstance(step, (int, float)):
        return
    try:
        exact = Fraction(repr(instance)) % Fraction(repr(step)) == 0
    except (ValueError, ZeroDivisionError):  # Infinity / NaN (json.loads reads them): a multiple of nothing
        exact = False
    if not exact:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {step!r}")


# Tool arguments are checked with this: Draft 2020-12, with multipleOf on exact decimals.
ArgumentValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"multipleOf": _exact_multiple_of})


@dataclasses.dataclass
class RunContext(Generic[DepsT]):
    """What the runtime injects into a tool parameter annotated ``RunContext[Deps]``.

    Such a parameter (in any position) is kept out of the tool's schema. ``deps`` is
    whatever the caller of the agent passed (a DB handle, settings...); ``run_id``,
    ``step`` and ``messages`` describe the run so far; ``tool_call_id`` is the id of
    the call being served (set by the registry per call).
    """

    deps: DepsT = None  # type: ignore[assignment]
    run_id: str = ""
    step: int = 0
    messages: list[Any] = dataclasses.field(default_factory=list)
    tool_call_id: str | None = None


class ToolArgumentsError(ValueError):
    """Arguments that do not satisfy a tool's schema; ``problems`` has one line per field."""

    def __init__(self, tool_name: str, problems: list[str]):
        self.tool_name = tool_name
        self.problems = list(problems)
        super().__init__(f"invalid arguments for tool {tool_name!r}: " + "; ".join(self.problems))


def serialize_result(value: Any) -> str:
    """Render a tool's return value as the text the model reads.

    ``str`` as is; pydantic models, dataclasses, dicts, lists, dates, sets... as
    compact JSON (pydantic's serializer); anything it cannot encode via ``str()``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return pydantic_core.to_json(value, fallback=str).decode()


@dataclasses.dataclass(eq=False)
class Tool:
    """A function the model may call, with its spec and arguments model.

    Calling a ``Tool`` object directly calls the wrapped function unchanged, so a
    decorated function stays usable from ordinary code. ``eager=False`` keeps a tool with side
    effects from starting before the model's whole turn is known to be valid.
    """

    name: str
    description: str
    spec: ToolSpec
    args_model: type[BaseModel]
    fn: Callable[..., Any]
    timeout_s: float | None = None
    eager: bool = True  # may start while the model still writes the turn's later calls (see Agent)
    takes_context: bool = False
    is_async: bool = False
    context_param: str | None = None
    params: tuple[ParamInfo, ...] = ()
    _validator: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._validator is None:  # built directly (subclasses, adapters): validate the spec as given
            self._validator = ArgumentValidator(self.spec.parameters)

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
        eager: bool = True,
    ) -> "Tool":
        """Build a tool from a sync or async function (raises :class:`ToolDefinitionError`)."""
        if isinstance(fn, Tool):
            fn = fn.fn
        if timeout_s is not None and not timeout_s > 0:
            raise ToolDefinitionError(name or getattr(fn, "__name__", "?"), [f"timeout_s must be > 0, got {timeout_s!r}"])
        fs: FunctionSchema = function_schema(fn, name=name, description=description,
                                             context_types=(RunContext,), localns=_caller_locals())
        try:
            jsonschema.Draft202012Validator.check_schema(fs.json_schema)
        except jsonschema.SchemaError as exc:  # a bug in schema cleaning rather than in the user's code
            raise ToolDefinitionError(fs.name, [f"its JSON Schema is invalid: {exc.message}"]) from exc
        result = cls(
            name=fs.name,
            description=fs.description,
            spec=ToolSpec(name=fs.name, description=fs.description, parameters=fs.json_schema),
            args_model=fs.args_model,
            fn=fn,
            timeout_s=timeout_s,
            eager=eager,
            takes_context=fs.context_param is not None,
            is_async=fs.is_async,
            context_param=fs.context_param,
            params=fs.params,
            _validator=ArgumentValidator(fs.json_schema),
        )
        if hasattr(fn, "__name__"):  # plain functions: the Tool looks like the function it wraps
            functools.update_wrapper(result, fn, updated=())  # type: ignore[arg-type]
        return result

    @classmethod
    def from_json_schema(
        cls,
        name: str,
        parameters: dict[str, Any],
        fn: Callable[..., Any],
        *,
        description: str = "",
        timeout_s: float | None = None,
        eager: bool = True,
    ) -> "Tool":
        """A tool described by a ready-made JSON Schema (an OpenAI function, a BFCL entry...).

        ``fn`` receives the validated arguments as keyword arguments; the schema alone
        validates them (there is no Python signature to derive a model from).
        """
        problems = [p for p in [name_problem(name)] if p]
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as exc:
            problems.append(f"parameters is not a valid JSON Schema: {exc.message}")
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            problems.append('parameters must be an object schema ({"type": "object", ...})')
        if not callable(fn):
            problems.append(f"fn must be callable, got {type(fn).__name__}")
        if problems:
            raise ToolDefinitionError(name, problems)
        model = pydantic.create_model(
            "".join(p.capitalize() for p in name.replace("-", "_").split("_") if p) + "Args",
            __config__=pydantic.ConfigDict(extra="allow"),
        )
        params = tuple(ParamInfo(p, p, False) for p in parameters.get("properties", {}))
        spec = ToolSpec(name=name, description=description, parameters=parameters)
        return cls(name=name, description=description, spec=spec, args_model=model, fn=fn, timeout_s=timeout_s,
                   eager=eager, is_async=inspect.iscoroutinefunction(fn), params=params)

    @property
    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the arguments (the same dict as ``spec.parameters``)."""
        return self.spec.parameters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def parse_arguments(self, arguments: dict[str, Any] | None) -> BaseModel:
        """Check ``arguments`` against the raw JSON Schema, then validate them into the model.

        Raises:
            ToolArgumentsError: every problem found, one per field.
        """
        arguments = {} if arguments is None else arguments
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(self.name, [f"arguments must be a JSON object, got {type(arguments).__name__}"])
        problems = [
            f"{_json_path(err.absolute_path)}: {_schema_error_message(err)}"
            for err in sorted(self._validator.iter_errors(arguments), key=lambda e: list(map(str, e.absolute_path)))
        ]
        if problems:
            raise ToolArgumentsError(self.name, problems)
        try:
            return self.args_model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            raise ToolArgumentsError(
                self.name, [f"{_json_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
            ) from exc

    async def invoke(self, arguments: dict[str, Any] | None, context: RunContext | None = None) -> Any:
        """Validate ``arguments`` and run the function; returns its raw value, raises its errors.

        Sync functions run in a worker thread (abandoned, not killed, if the caller's
        timeout fires; the calling registry's limiter bounds how many run at once);
        async ones are awaited in the caller's task.
        """
        model = self.parse_arguments(arguments)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        extra = model.model_extra or {}
        for p in self.params:
            if p.field_name in type(model).model_fields:
                value = getattr(model, p.field_name)
            elif p.field_name in extra:  # tools made from a bare JSON Schema
                value = extra[p.field_name]
            else:
                continue  # an optional property the call left out: the function's own default
            if p.positional_only:
                args.append(value)
            else:
                kwargs[p.name] = value
        if self.context_param is not None:
            kwargs[self.context_param] = context if context is not None else RunContext()
        if self.is_async:
            result = await self.fn(*args, **kwargs)
        else:
            result = await anyio.to_thread.run_sync(
                functools.partial(self.fn, *args, **kwargs), abandon_on_cancel=True,
                limiter=_THREAD_LIMITER.get(),
            )
        if inspect.isawaitable(result):  # a sync wrapper returning a coroutine
            result = await result
        return result


def _schema_error_message(err: jsonschema.ValidationError) -> str:
    """The message of a jsonschema error; for anyOf/oneOf failures, the most relevant branch's."""
    if err.context:
        branches: list[str] = []
        for sub in err.context:  # one or more errors per anyOf branch; say what each wanted
            inner = ".".join(map(str, sub.relative_path))
            text = f"{inner + ': ' if inner else ''}{sub.message}"
            if text not in branches:
                branches.append(text)
        return " or ".join(branches[:4])
    return err.message


def _caller_locals() -> dict[str, Any]:
    """The locals of the user's frame that defined the tool (the first frame outside
    agentrt, so ``Agent(llm, [fn])`` works too), to resolve string annotations of local types."""
    frame = sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("agentrt."):
        frame = frame.f_back
    return dict(frame.f_locals) if frame is not None else {}


def _json_path(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    return ".".join(parts) if parts else "(arguments)"


def _error_text(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ToolRegistry:
    """An ordered set of tools by name, able to describe and call them.

    Args:
        default_timeout_s: the timeout for tools that set none (None = no limit).
        max_result_chars: cut tool results longer than this (None = never), so one
            big result cannot flood a small model's context.
        max_threads: how many sync tools of this registry may run at once (per event
            loop). A sync tool that times out is abandoned, not killed; this limit keeps
            such threads from using up anyio's shared pool (FastAPI draws on it too).
    """

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), *,
                 default_timeout_s: float | None = None, max_result_chars: int | None = None,
                 max_threads: int = 16):
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self._tools: dict[str, Tool] = {}
        self.default_timeout_s = default_timeout_s
        self.max_result_chars = max_result_chars
        self.max_threads = max_threads
        # One limiter per event loop: a limiter is not safe to share between loops (threads).
        self._limiters: weakref.WeakKeyDictionary[Any, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()
        self._limiters_lock = threading.Lock()
        for t in tools:
            self.register(t)

    # -- registration ---------------------------------------------------------------
    @overload
    def tool(self, fn: F, *, name: str | None = None, description: str | None = None,
             timeout_s: float | None = None, eager: bool | None = None) -> Tool: ...

    @overload
    def tool(self, fn: None = None, *, name: str | None = None, description: str | None = None,
             timeout_s: float | None = None, eager: bool | None = None) -> Callable[[F], Tool]: ...

    def tool(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
             description: str | None = None, timeout_s: float | None = None, eager: bool | None = None) -> Any:
        """Decorator: ``@registry.tool`` or ``@registry.tool(name=..., timeout_s=..., eager=False)``; returns the Tool."""

        def decorate(f: Callable[..., Any]) -> Tool:
            return self.register(f, name=name, description=description, timeout_s=timeout_s, eager=eager)

        return decorate(fn) if fn is not None else decorate

    def register(self, fn_or_tool: Tool | Callable[..., Any], *, name: str | None = None,
                 description: str | None = None, timeout_s: float | None = None, eager: bool | None = None,
                 replace: bool = False) -> Tool:
        """Add a function or a :class:`Tool`; returns the Tool (``eager``: see `Tool`; None keeps the
        Tool's own setting, True for a function).

        Raises:
            ToolDefinitionError: the function cannot be described (every problem listed).
            ValueError: another tool already has this name (pass ``replace=True``).
        """
        if isinstance(fn_or_tool, Tool) and name is None and description is None and timeout_s is None:
            t = fn_or_tool if eager is None else dataclasses.replace(fn_or_tool, eager=eager)
        elif isinstance(fn_or_tool, Tool):
            t = Tool.from_function(
                fn_or_tool.fn,
                name=name or fn_or_tool.name,
                description=description if description is not None else fn_or_tool.description,
                timeout_s=timeout_s if timeout_s is not None else fn_or_tool.timeout_s,
                eager=eager if eager is not None else fn_or_tool.eager,
            )
        elif callable(fn_or_tool):
            t = Tool.from_function(fn_or_tool, name=name, description=description, timeout_s=timeout_s,
                                   eager=True if eager is None else eager)
        else:
            raise TypeError(f"register() needs a function or a Tool, got {type(fn_or_tool).__name__}")
        existing = self._tools.get(t.name)
        if existing is not None and not replace and existing.fn is not t.fn:
            raise ValueError(f"a tool named {t.name!r} is already registered; pass replace=True or another name")
        self._tools[t.name] = t
        return t

    def remove(self, name: str) -> Tool:
        """Unregister and return the tool ``name`` (KeyError if unknown)."""
        tool_ = self.get(name)
        del self._tools[name]
        return tool_

    # -- lookup -----------------------------------------------------------------------
    def get(self, name: str) -> Tool:
        """The tool called ``name``; KeyError naming the known tools otherwise."""
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(self._tools) or "(none)"
            raise KeyError(f"no tool named {name!r}; known tools: {known}") from None

    @property
    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def __repr__(self) -> str:
        return f"ToolRegistry({self.names!r})"

    def specs(self, names: list[str] | None = None) -> list[ToolSpec]:
        """The specs of all tools (registration order) or of ``names`` (in that order)."""
        chosen = self._tools.values() if names is None else [self.get(n) for n in names]
        return [t.spec for t in chosen]

    def subset(self, names: Iterable[str]) -> "ToolRegistry":
        """A new registry with only ``names`` (KeyError for an unknown one); same settings."""
        return ToolRegistry([self.get(n) for n in names], default_timeout_s=self.default_timeout_s,
                            max_result_chars=self.max_result_chars, max_threads=self.max_threads)

    # -- calling ----------------------------------------------------------------------
    async def call(self, call: ToolCall, *, context: RunContext | None = None,
                   timeout_s: float | None = None) -> ToolResult:
        """Run one call and return its result; never raises for the call's own failures.

        Unknown tools, invalid arguments, exceptions and timeouts come back as
        ``ToolResult(is_error=True, content="<ErrorType>: <message>")``. Only
        cancellation of the caller propagates. The timeout is ``timeout_s`` if given,
        else the tool's, else the registry's default.
        """
        started = time.perf_counter()

        def result(content: str, is_error: bool) -> ToolResult:
            return ToolResult(call_id=call.id, name=call.name, content=self._cut(content), is_error=is_error,
                              duration_s=time.perf_counter() - started)

        tool_ = self._tools.get(call.name)
        if tool_ is None:
            known = ", ".join(self._tools) or "(none)"
            return result(f"UnknownToolError: no tool named {call.name!r}; known tools: {known}", True)
        limit = timeout_s if timeout_s is not None else (
            tool_.timeout_s if tool_.timeout_s is not None else self.default_timeout_s)
        if context is not None and tool_.takes_context:
            context = dataclasses.replace(context, tool_call_id=call.id)
        try:
            # move_on_after rather than fail_after: a TimeoutError raised by the tool itself
            # (a socket, say) must read as the tool's error, not as our deadline.
            token = _THREAD_LIMITER.set(self._thread_limiter())
            try:
                with anyio.move_on_after(limit) as scope:
                    value = await tool_.invoke(call.arguments, context)
            finally:
                _THREAD_LIMITER.reset(token)
            if scope.cancelled_caught:
                return result(f"TimeoutError: tool {call.name!r} did not finish within {limit:g} s", True)
            return result(serialize_result(value), False)
        except ToolArgumentsError as exc:
            return result(f"ValidationError: {exc}", True)
        except Exception as exc:  # noqa: BLE001 - the tool's own failure: the model reads it and may retry
            return result(_error_text(exc), True)

    async def call_many(self, calls: list[ToolCall], *, context: RunContext | None = None,
                        timeout_s: float | None = None) -> list[ToolResult]:
        """Run several calls concurrently (one task group); results in call order."""
        results: list[ToolResult | None] = [None] * len(calls)

        async def run(i: int, c: ToolCall) -> None:
            results[i] = await self.call(c, context=context, timeout_s=timeout_s)

        async with anyio.create_task_group() as tg:
            for i, c in enumerate(calls):
                tg.start_soon(run, i, c)
        return [r for r in results if r is not None]

    def _thread_limiter(self) -> anyio.CapacityLimiter | None:
        """This registry's thread limiter for the running event loop (None: anyio's shared one)."""
        loop = anyio.lowlevel.current_token().native_token
        with self._limiters_lock:
            try:
                limiter = self._limiters.get(loop)
                if limiter is None:
                    limiter = self._limiters[loop] = anyio.CapacityLimiter(self.max_threads)
            except TypeError:  # a loop object that cannot be weakly referenced
                return None
        return limiter

    def _cut(self, content: str) -> str:
        limit = self.max_result_chars
        if limit is None or len(content) <= limit:
            return content
        return content[:limit] + f"...[cut {len(content) - limit} chars]"


default_registry = ToolRegistry()
"""The registry that the module-level :func:`tool` decorator fills."""


@overload
def tool(fn: F, *, name: str | None = None, description: str | None = None,
         timeout_s: float | None = None, eager: bool = True) -> Tool: ...


@overload
def tool(fn: None = None, *, name: str | None = None, description: str | None = None,
         timeout_s: float | None = None, eager: bool = True) -> Callable[[F], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None, timeout_s: float | None = None, eager: bool = True) -> Any:
    """Register a sync or async function into :data:`default_registry`; returns its :class:`Tool`.

    Use bare (``@tool``) or with options (``@tool(name="add", timeout_s=5)``). ``eager=False``:
    a tool with side effects runs only once the model's whole turn is known to be valid, never
    while the model is still writing it. A later definition with the same name replaces the
    earlier one in the default registry (re-imports and notebooks redefine functions).
    """

    def decorate(f: Callable[..., Any]) -> Tool:
        return default_registry.register(f, name=name, description=description, timeout_s=timeout_s, eager=eager,
                                         replace=True)

    return decorate(fn) if fn is not None else decorate
