"""MCPClient against real MCP servers: `mcp-server-time` from PyPI over stdio (its tools join an agent,
grammar-constrained, on the embedded model), a server killed mid-run, and servers that misbehave."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import jsonschema
import pytest

pytest.importorskip("mcp", reason="MCP support is the optional 'mcp' extra")
pytest.importorskip("mcp_server_time", reason="the real MCP server under test (PyPI mcp-server-time) is not installed")

from agentrt.mcp_client import MCPClient, MCPError
from agentrt.planner import Agent
from agentrt.registry import ToolDefinitionError, ToolRegistry
from agentrt.testing import ScriptedLLM
from agentrt.types import ToolCall

TIME_SERVER = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
MISBEHAVING = [sys.executable, str(Path(__file__).parent / "helpers" / "mcp_misbehaving.py")]


def server_pids(marker: str) -> list[int]:
    """Our child processes whose command line contains ``marker`` (the stdio servers we started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == os.getpid() and marker in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def time_server():
    with MCPClient(TIME_SERVER, name="time") as client:
        yield client


async def test_a_real_servers_tools_keep_their_schemas_and_answer(time_server):
    assert [t.name for t in time_server.tools] == ["get_current_time", "convert_time"]
    get_time = time_server.tools[0]
    assert get_time.spec.parameters["required"] == ["timezone"] and "IANA" in get_time.spec.parameters[
        "properties"]["timezone"]["description"]
    registry = ToolRegistry(time_server.tools)
    ok = await registry.call(ToolCall(id="c1", name="get_current_time", arguments={"timezone": "Europe/London"}))
    assert not ok.is_error and json.loads(ok.content)["timezone"] == "Europe/London"
    bad = await registry.call(ToolCall(id="c2", name="get_current_time", arguments={"timezone": "Nowhere/Atlantis"}))
    assert bad.is_error and "MCPToolError" in bad.content and "Nowhere/Atlantis" in bad.content
    invalid = await registry.call(ToolCall(id="c3", name="get_current_time", arguments={"tz": "UTC"}))
    assert invalid.is_error and "ValidationError" in invalid.content and "timezone" in invalid.content


async def test_a_server_killed_mid_run_becomes_an_error_result_and_the_run_ends_cleanly(time_server):
    def stop_the_time_server() -> str:
        """Stop the time server."""
        for pid in server_pids("mcp_server_time"):
            os.kill(pid, signal.SIGKILL)
        return "stopped"

    script = [{"calls": [{"tool": "get_current_time", "arguments": {"timezone": "UTC"}}]},
              {"calls": [{"tool": "stop_the_time_server", "arguments": {}}]},
              {"calls": [{"tool": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}]},
              {"answer": "the time server is gone"}]
    agent = Agent(ScriptedLLM(script), [*time_server.tools, stop_the_time_server], tool_timeout_s=30)
    started = time.perf_counter()
    result = await agent.run("What time is it?")
    assert result.status == "completed" and time.perf_counter() - started < 20
    first, _, after = (s.results[0] for s in result.steps[:3])
    assert not first.is_error
    assert after.is_error and "MCPError" in after.content and "stopped answering" in after.content
    # later calls fail at once with the same reason
    again = await ToolRegistry(time_server.tools).call(ToolCall(id="c9", name="get_current_time",
                                                                arguments={"timezone": "UTC"}))
    assert again.is_error and "not available" in again.content and again.duration_s < 1


def test_a_command_that_does_not_exist_is_a_clear_error():
    with pytest.raises(MCPError, match="no-such-mcp-server.*No such file"):
        MCPClient("no-such-mcp-server --stdio")


def test_a_server_that_crashes_at_start_is_quoted():
    with pytest.raises(MCPError, match="its stderr ends:.*No module named"):
        MCPClient([sys.executable, "-m", "no_such_module_for_mcp"])


def test_a_malformed_tool_list_is_a_clear_error():
    with pytest.raises(MCPError, match="tool list that is not valid MCP: tools.0.inputSchema: .*; tools.0.name: Field required"):
        MCPClient([*MISBEHAVING, "malformed"])


def test_a_server_that_never_answers_times_out_at_start():
    started = time.perf_counter()
    with pytest.raises(MCPError, match="did not answer within 2 s"):
        MCPClient([*MISBEHAVING, "silent"], connect_timeout_s=2)
    assert time.perf_counter() - started < 10


async def test_a_call_that_hangs_becomes_a_timeout_result_and_the_session_lives_on():
    with MCPClient([*MISBEHAVING, "hang"], call_timeout_s=1) as client:
        registry = ToolRegistry(client.tools)
        slow = await registry.call(ToolCall(id="s", name="slow", arguments={}))
        assert slow.is_error and "TimeoutError" in slow.content and slow.duration_s < 5
        echo = await registry.call(ToolCall(id="e", name="echo", arguments={"text": "still here"}))
        assert not echo.is_error and echo.content == "still here"


def test_schemas_the_grammar_cannot_enforce_are_refused_by_name():
    with pytest.raises(ToolDefinitionError) as refused:
        MCPClient([*MISBEHAVING, "unsupported"])
    assert "'scale'" in str(refused.value) and "multipleOf" in str(refused.value)
    assert "'echo'" not in str(refused.value)
    with MCPClient([*MISBEHAVING, "unsupported"], skip_unsupported=True, prefix="demo") as client:
        assert [t.name for t in client.tools] == ["demo_echo"]


def test_close_stops_the_server_process():
    client = MCPClient(TIME_SERVER)
    assert server_pids("mcp_server_time")
    client.close()
    client.close()  # twice is fine
    deadline = time.monotonic() + 10
    while server_pids("mcp_server_time") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server_pids("mcp_server_time")


@pytest.mark.e2e
def test_an_agent_on_the_embedded_model_calls_the_real_server(time_server):
    import torch

    from agentrt.llm import LocalLLM

    torch.set_num_threads(2)
    with LocalLLM() as llm:
        agent = Agent(llm, time_server.tools, tool_choice="required", parallel_tool_calls=False, max_steps=2)
        result = agent.run_sync("What is the current time in the timezone Europe/Paris?")
    first = result.steps[0]
    assert first.calls and first.calls[0].name in {"get_current_time", "convert_time"}
    call = first.calls[0]
    schema = next(t.spec.parameters for t in time_server.tools if t.name == call.name)
    jsonschema.validate(call.arguments, schema)  # the grammar's promise, on a real server's schema
    reply = first.results[0]
    # the server's own answer came back (a time, or its complaint about a made-up timezone)
    assert "datetime" in reply.content or "MCPToolError" in reply.content, reply.content


@pytest.mark.e2e
def test_the_example_runs():
    import subprocess

    example = Path(__file__).parent.parent / "examples" / "mcp_time_agent.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "called get_current_time(" in done.stdout
