"""The tool registry: decorators, specs, lookups, and safe calls (validation, errors, timeouts,
context injection, concurrency)."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Annotated, Any, Optional

import anyio
import pytest
from pydantic import BaseModel, Field

from agentrt.registry import (
    RunContext,
    Tool,
    ToolArgumentsError,
    ToolDefinitionError,
    ToolRegistry,
    default_registry,
    serialize_result,
    tool,
)
from agentrt.types import ToolCall, ToolSpec


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(id=f"call_{name}", name=name, arguments=arguments)


@pytest.fixture
def reg() -> ToolRegistry:
    r = ToolRegistry()

    @r.tool
    def add(a: int, b: int = 2) -> int:
        """Add two integers.

        Args:
            a: the first number.
            b: the second number.
        """
        return a + b

    @r.tool(name="shout", timeout_s=5)
    async def loud(text: str) -> str:
        """Upper-case a text."""
        await anyio.sleep(0)
        return text.upper()

    @r.tool
    def boom(msg: str) -> None:
        """Always fails."""
        raise RuntimeError(msg)

    return r


# -- registration and specs ---------------------------------------------------------------

def test_decorator_returns_tool_that_still_calls_the_function(reg: ToolRegistry) -> None:
    add = reg.get("add")
    assert isinstance(add, Tool)
    assert add(3, 4) == 7  # direct calls are unchanged
    assert add.__name__ == "add" and "Add two" in (add.__doc__ or "")
    assert reg.names == ["add", "shout", "boom"]
    assert len(reg) == 3 and "shout" in reg and "loud" not in reg
    assert [t.name for t in reg] == reg.names


def test_spec_from_signature_and_docstring(reg: ToolRegistry) -> None:
    spec = reg.get("add").spec
    assert isinstance(spec, ToolSpec)
    assert spec.description == "Add two integers."
    assert spec.parameters == {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "description": "the first number."},
            "b": {"type": "integer", "description": "the second number.", "default": 2},
        },
        "required": ["a"],
        "additionalProperties": False,
    }
    assert reg.get("shout").timeout_s == 5 and reg.get("shout").is_async
    assert [s.name for s in reg.specs()] == ["add", "shout", "boom"]
    assert [s.name for s in reg.specs(["boom", "add"])] == ["boom", "add"]


def test_get_unknown_names_known_tools(reg: ToolRegistry) -> None:
    with pytest.raises(KeyError, match="no tool named 'nope'; known tools: add, shout, boom"):
        reg.get("nope")
    with pytest.raises(KeyError, match="nope"):
        reg.specs(["add", "nope"])


def test_subset_and_remove(reg: ToolRegistry) -> None:
    sub = reg.subset(["boom", "add"])
    assert sub.names == ["boom", "add"] and sub.get("add") is reg.get("add")
    with pytest.raises(KeyError):
        reg.subset(["zzz"])
    reg.remove("boom")
    assert "boom" not in reg and "boom" in sub


def test_duplicate_names_need_replace(reg: ToolRegistry) -> None:
    def add(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="already registered"):
        reg.register(add)
    reg.register(add, replace=True)
    assert list(reg.get("add").spec.parameters["properties"]) == ["x"]
    reg.register(reg.get("add"))  # the same tool again is harmless


def test_register_tool_under_new_name(reg: ToolRegistry) -> None:
    other = ToolRegistry()
    t = other.register(reg.get("add"), name="plus", timeout_s=1.5)
    assert t.name == "plus" and t.spec.name == "plus" and t.timeout_s == 1.5
    assert t.description == "Add two integers."


def test_module_level_tool_registers_in_default_registry() -> None:
    @tool(name="registry_test_echo", description="Echo it back.")
    def echo(text: str) -> str:
        return text

    try:
        assert default_registry.get("registry_test_echo") is echo
        assert echo.spec.description == "Echo it back."

        @tool(name="registry_test_echo")
        def echo2(word: str) -> str:
            return word

        # redefinition replaces in the default registry (notebooks, re-imports)
        assert list(default_registry.get("registry_test_echo").spec.parameters["properties"]) == ["word"]
    finally:
        default_registry.remove("registry_test_echo")


def test_definition_errors_are_collected_once() -> None:
    r = ToolRegistry()

    def bad(a, b: int, *rest: int, c: "NoSuchType", _hidden: int = 0, **kw: Any) -> None:  # noqa: F821
        """Bad.

        Args:
            zzz: not a parameter.
        """

    with pytest.raises(ToolDefinitionError) as info:
        r.register(bad)
    err = info.value
    assert isinstance(err, TypeError)
    text = str(err)
    assert "parameter 'c': cannot resolve its type hint 'NoSuchType'" in text
    assert "parameter 'a' has no type hint" in text
    assert "*rest" in text and "**kw" in text
    assert "'_hidden'" in text
    assert "'zzz'" in text
    assert len(err.problems) >= 6
    assert "bad" not in r


def test_unsupported_type_is_named() -> None:
    class Opaque:
        pass

    def f(x: Opaque, y: int, z: threading.Lock) -> None:  # type: ignore[valid-type]
        """F."""

    with pytest.raises(ToolDefinitionError) as info:
        Tool.from_function(f)
    assert len(info.value.problems) == 2
    assert "parameter 'x': unsupported type Opaque" in str(info.value)
    assert "parameter 'z'" in str(info.value)


def test_bad_tool_name_and_timeout() -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(ToolDefinitionError, match="tool name 'has space'"):
        Tool.from_function(f, name="has space")
    with pytest.raises(ToolDefinitionError, match="timeout_s must be > 0"):
        Tool.from_function(f, timeout_s=0)


# -- calling ---------------------------------------------------------------------------------

async def test_call_sync_and_async(reg: ToolRegistry) -> None:
    r1 = await reg.call(call("add", a=1))
    assert (r1.content, r1.is_error, r1.call_id, r1.name) == ("3", False, "call_add", "add")
    assert r1.duration_s >= 0
    r2 = await reg.call(call("shout", text="hi"))
    assert (r2.content, r2.is_error) == ("HI", False)


async def test_sync_tools_run_in_a_worker_thread() -> None:
    r = ToolRegistry()
    main = threading.get_ident()

    @r.tool
    def where() -> bool:
        """Is this the event loop's thread?"""
        return threading.get_ident() == main

    assert (await r.call(call("where"))).content == "false"


async def test_bad_arguments_become_error_results(reg: ToolRegistry) -> None:
    res = await reg.call(call("add", a="one", extra=1))
    assert res.is_error
    assert res.content.startswith("ValidationError: invalid arguments for tool 'add'")
    assert "a: 'one' is not of type 'integer'" in res.content
    assert "'extra' was unexpected" in res.content
    missing = await reg.call(call("add"))
    assert missing.is_error and "'a' is a required property" in missing.content


async def test_exception_becomes_error_result(reg: ToolRegistry) -> None:
    res = await reg.call(call("boom", msg="disk on fire"))
    assert res.is_error and res.content == "RuntimeError: disk on fire"


async def test_unknown_tool_becomes_error_result(reg: ToolRegistry) -> None:
    res = await reg.call(call("nope"))
    assert res.is_error and res.content == "UnknownToolError: no tool named 'nope'; known tools: add, shout, boom"


async def test_timeouts_tool_call_and_registry_default() -> None:
    r = ToolRegistry(default_timeout_s=0.2)

    @r.tool(timeout_s=0.1)
    async def slow_async() -> str:
        """Sleeps."""
        await anyio.sleep(5)
        return "done"

    @r.tool
    def slow_sync() -> str:
        """Sleeps in a thread."""
        time.sleep(1.0)
        return "done"

    t0 = time.perf_counter()
    res = await r.call(call("slow_async"))
    assert res.is_error and res.content == "TimeoutError: tool 'slow_async' did not finish within 0.1 s"
    res = await r.call(call("slow_sync"))  # the registry default applies
    assert res.is_error and "within 0.2 s" in res.content
    res = await r.call(call("slow_async"), timeout_s=0.05)  # the call's own timeout overrides
    assert res.is_error and "within 0.05 s" in res.content
    assert time.perf_counter() - t0 < 0.9  # nobody waited for the sleeping thread


async def test_timeout_error_raised_by_tool_is_not_our_deadline() -> None:
    r = ToolRegistry()

    @r.tool
    def flaky() -> str:
        """Raises a TimeoutError of its own."""
        raise TimeoutError("upstream timed out")

    res = await r.call(call("flaky"))
    assert res.is_error and res.content == "TimeoutError: upstream timed out"


async def test_context_is_injected_and_hidden_from_schema() -> None:
    r = ToolRegistry()

    @dataclasses.dataclass
    class Deps:
        user: str

    @r.tool
    def whoami(greeting: str, ctx: RunContext[Deps]) -> str:
        """Greet the current user."""
        return f"{greeting} {ctx.deps.user} (run {ctx.run_id}, step {ctx.step}, call {ctx.tool_call_id})"

    @r.tool
    def optional_ctx(x: int, ctx: Optional[RunContext[Deps]] = None) -> str:
        """An optional context is still a context."""
        return f"{x} {ctx.deps.user if ctx else None}"

    assert list(r.get("optional_ctx").json_schema["properties"]) == ["x"]
    assert (await r.call(call("optional_ctx", x=1), context=RunContext(deps=Deps("bo")))).content == "1 bo"

    @r.tool
    def no_ctx(ctx: RunContext) -> str:
        """Reads the context when none was given."""
        return repr(ctx.deps)

    t = r.get("whoami")
    assert t.takes_context and t.context_param == "ctx"
    assert list(t.spec.parameters["properties"]) == ["greeting"]
    ctx = RunContext(deps=Deps("ada"), run_id="r1", step=3)
    res = await r.call(call("whoami", greeting="hi"), context=ctx)
    assert res.content == "hi ada (run r1, step 3, call call_whoami)"
    assert ctx.tool_call_id is None  # the caller's context object is not mutated
    assert (await r.call(call("no_ctx"))).content == "None"


async def test_call_many_runs_concurrently_in_order() -> None:
    r = ToolRegistry()

    @r.tool
    async def wait(seconds: float, label: str) -> str:
        """Wait, then return the label."""
        await anyio.sleep(seconds)
        return label

    @r.tool
    def wait_sync(seconds: float, label: str) -> str:
        """Wait in a thread, then return the label."""
        time.sleep(seconds)
        return label

    calls = [
        ToolCall(id="1", name="wait", arguments={"seconds": 0.5, "label": "a"}),
        ToolCall(id="2", name="wait_sync", arguments={"seconds": 0.5, "label": "b"}),
        ToolCall(id="3", name="wait", arguments={"seconds": 0.0, "label": "c"}),
        ToolCall(id="4", name="missing", arguments={}),
    ]
    t0 = time.perf_counter()
    results = await r.call_many(calls)
    elapsed = time.perf_counter() - t0
    assert [x.call_id for x in results] == ["1", "2", "3", "4"]
    assert [x.content for x in results[:3]] == ["a", "b", "c"]
    assert results[3].is_error
    assert elapsed < 0.95, elapsed  # serial would take >= 1.0 s


async def test_cancellation_propagates() -> None:
    r = ToolRegistry()

    @r.tool
    async def forever() -> str:
        """Never returns."""
        await anyio.sleep(60)
        return "x"

    task = asyncio.ensure_future(r.call(call("forever")))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_max_result_chars_cuts_long_results() -> None:
    r = ToolRegistry(max_result_chars=10)

    @r.tool
    def long() -> str:
        """A long text."""
        return "x" * 25

    assert (await r.call(call("long"))).content == "x" * 10 + "...[cut 15 chars]"


def test_parse_arguments_lists_every_problem(reg: ToolRegistry) -> None:
    with pytest.raises(ToolArgumentsError) as info:
        reg.get("add").parse_arguments({"a": 1.5, "b": "x", "c": 0})
    assert len(info.value.problems) == 3
    with pytest.raises(ToolArgumentsError, match="must be a JSON object"):
        reg.get("add").parse_arguments([1, 2])  # type: ignore[arg-type]


# -- results ---------------------------------------------------------------------------------

class Weather(BaseModel):
    city: str
    temp_c: float


@dataclasses.dataclass
class Pair:
    left: int
    right: list[str]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain text", "plain text"),
        (Weather(city="Oslo", temp_c=-3.5), '{"city":"Oslo","temp_c":-3.5}'),
        (Pair(1, ["a"]), '{"left":1,"right":["a"]}'),
        ({"k": [1, 2.5, None, True]}, '{"k":[1,2.5,null,true]}'),
        (None, "null"),
        (42, "42"),
        (object, '"<class \'object\'>"'),  # not JSON-able: its str(), as a JSON string
    ],
)
def test_serialize_result(value: Any, text: str) -> None:
    assert serialize_result(value) == text


async def test_pydantic_model_arguments_arrive_as_models() -> None:
    r = ToolRegistry()

    @r.tool
    def report(w: Weather, note: Annotated[str, Field(description="a note", max_length=5)] = "") -> Weather:
        """Echo the weather."""
        assert isinstance(w, Weather)
        return Weather(city=w.city.upper(), temp_c=w.temp_c + 1)

    res = await r.call(call("report", w={"city": "oslo", "temp_c": 1}))
    assert res.content == '{"city":"OSLO","temp_c":2.0}'
    bad = await r.call(call("report", w={"city": "oslo", "temp_c": 1}, note="too long"))
    assert bad.is_error and "note:" in bad.content


# -- every kind of callable ------------------------------------------------------------------

class _Service:
    def __init__(self) -> None:
        self.factor = 10

    def scale(self, x: int) -> int:
        """Scale x by the service's factor."""
        return x * self.factor

    async def ascale(self, x: int, ctx: RunContext) -> int:
        """Scale x, asynchronously."""
        return x * self.factor + ctx.step

    @staticmethod
    def identity(y: float) -> float:
        """Return y."""
        return y


class _Echo:
    def __call__(self, q: str) -> str:
        """Echo q."""
        return q


class _AsyncEcho:
    async def __call__(self, q: str) -> str:
        """Echo q loudly."""
        return q + "!"


def _base_add(a: int, b: int) -> int:
    """Add a and b."""
    return a + b


async def test_methods_callables_and_partials() -> None:
    import functools

    svc = _Service()
    r = ToolRegistry()
    r.register(svc.scale)
    r.register(svc.ascale)
    r.register(_Service.identity)
    r.register(_Echo(), name="echo")
    r.register(_AsyncEcho(), name="aecho")
    r.register(functools.partial(_base_add, b=5), name="add5")
    assert [(t.name, t.is_async) for t in r] == [
        ("scale", False), ("ascale", True), ("identity", False), ("echo", False), ("aecho", True), ("add5", False)]
    assert [t.description for t in r] == [
        "Scale x by the service's factor.", "Scale x, asynchronously.", "Return y.", "Echo q.", "Echo q loudly.",
        "Add a and b."]
    assert r.get("add5").json_schema["properties"]["b"] == {"type": "integer", "default": 5}
    cases = [("scale", {"x": 2}, "20"), ("ascale", {"x": 3}, "32"), ("identity", {"y": 1.5}, "1.5"),
             ("echo", {"q": "hi"}, "hi"), ("aecho", {"q": "hi"}, "hi!"), ("add5", {"a": 1}, "6"),
             ("add5", {"a": 1, "b": 2}, "3")]
    for name, args, expected in cases:
        res = await r.call(ToolCall(id="1", name=name, arguments=args), context=RunContext(step=2))
        assert (res.is_error, res.content) == (False, expected), name


async def test_tool_built_directly_validates_its_spec() -> None:
    async def fn(**kwargs: Any) -> str:
        return ",".join(sorted(kwargs))

    spec = ToolSpec(name="raw", parameters={"type": "object", "properties": {"k": {"type": "integer"}},
                                            "required": ["k"], "additionalProperties": False})
    from pydantic import ConfigDict, create_model

    t = Tool(name="raw", description="", spec=spec, args_model=create_model("RawArgs", __config__=ConfigDict(extra="allow")),
             fn=fn, is_async=True)
    with pytest.raises(ToolArgumentsError, match="'k' is a required property"):
        t.parse_arguments({})


def test_defaults_must_fit_their_type() -> None:
    def f(a: int = None, b: str = 3, c: float = 1, d: list[int] = [1, 2]) -> None:  # type: ignore[assignment]
        """F."""

    with pytest.raises(ToolDefinitionError) as info:
        Tool.from_function(f)
    assert info.value.problems == [
        "parameter 'a': its default None is not a valid int; annotate it Optional[int]",
        "parameter 'b': its default 3 is not a valid str",
    ]


def test_names_follow_the_openai_rule() -> None:
    def f() -> None:
        """F."""

    for bad in ("a.b", "1abc", "x" * 65, "name with space"):
        with pytest.raises(ToolDefinitionError, match="must start with a letter"):
            Tool.from_function(f, name=bad)
    for good in ("get_weather", "get-weather", "_private", "A1"):
        assert Tool.from_function(f, name=good).name == good


async def test_tool_from_json_schema() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city"], "additionalProperties": False}

    def forecast(city: str, days: int = 1) -> dict:
        return {"city": city, "days": days}

    t = Tool.from_json_schema("forecast", schema, forecast, description="Forecast.", timeout_s=2)
    assert t.spec == ToolSpec(name="forecast", description="Forecast.", parameters=schema)
    r = ToolRegistry([t])
    assert (await r.call(call("forecast", city="Oslo"))).content == '{"city":"Oslo","days":1}'
    assert (await r.call(call("forecast", city="Oslo", days=3))).content == '{"city":"Oslo","days":3}'
    bad = await r.call(call("forecast", days="x"))
    assert bad.is_error and "'city' is a required property" in bad.content and "days: 'x'" in bad.content
    with pytest.raises(ToolDefinitionError) as info:
        Tool.from_json_schema("bad name", {"type": "array", "items": 3}, forecast)
    assert len(info.value.problems) == 3


async def test_sync_tools_are_bounded_by_the_registry_thread_limit() -> None:
    r = ToolRegistry(max_threads=2)
    running = 0
    peak = 0
    lock = threading.Lock()

    @r.tool
    def busy(i: int) -> int:
        """Occupy a thread for a while."""
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return i

    results = await r.call_many([ToolCall(id=str(i), name="busy", arguments={"i": i}) for i in range(6)])
    assert [x.content for x in results] == [str(i) for i in range(6)]
    assert peak == 2
    with pytest.raises(ValueError, match="max_threads"):
        ToolRegistry(max_threads=0)


def test_one_registry_serves_several_event_loops_at_once() -> None:
    r = ToolRegistry(max_threads=2)

    @r.tool
    def nap(i: int) -> int:
        """Sleep briefly."""
        time.sleep(0.02)
        return i

    outcomes: list[list[str]] = []

    async def batch() -> None:
        results = await r.call_many([ToolCall(id=str(i), name="nap", arguments={"i": i}) for i in range(5)])
        outcomes.append([x.content for x in results])

    threads = [threading.Thread(target=lambda: asyncio.run(batch()), daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a loop hung on another loop's limiter"
    assert outcomes == [["0", "1", "2", "3", "4"]] * 3
