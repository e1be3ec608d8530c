"""`agentrt mcp` driven by the official MCP SDK's own client, over stdio and over streamable HTTP on
127.0.0.1: list the tools, call `calculate`, and run the whole agent on the embedded model (`agent_run`)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import AsyncIterator

import pytest

mcp = pytest.importorskip("mcp", reason="MCP support is the optional 'mcp' extra")

from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from tests.helpers.server import free_port  # noqa: E402

AGENT_ARGS = ["--max-steps", "2", "--max-tokens", "64", "--tool-choice", "calculate"]
TASK = "What is 37 times 41? Use the calculator."


@contextlib.asynccontextmanager
async def stdio_session() -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "agentrt.cli", "mcp", *AGENT_ARGS],
                                   env={"PYTHONPATH": os.getcwd()})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@pytest.fixture(scope="module")
def http_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agentrt.cli", "mcp", "--transport", "http", "--port", str(port),
                             *AGENT_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"agentrt mcp --transport http did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(timeout=30)


@contextlib.asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def check_tools_and_calculate(session: ClientSession) -> None:
    listed = {t.name: t for t in (await session.list_tools()).tools}
    assert {"calculate", "current_time", "convert_units", "agent_run"} <= set(listed)
    assert "read_file" not in listed  # no file tools unless --files-root
    assert listed["calculate"].input_schema["required"] == ["expression"]
    ok = await session.call_tool("calculate", {"expression": "2*(3+18)"})
    assert not ok.is_error and ok.content[0].text == "42"
    bad = await session.call_tool("calculate", {"expr": "1"})  # the registry's validation, as an error result
    assert bad.is_error and "expression" in bad.content[0].text
    with pytest.raises(MCPError, match="unknown tool 'nope'"):
        await session.call_tool("nope", {})
    refused = await session.call_tool("agent_run", {"task": ""})
    assert refused.is_error and "ValidationError" in refused.content[0].text


async def check_agent_run(session: ClientSession) -> None:
    result = await session.call_tool("agent_run", {"task": TASK})
    summary = result.structured_content
    assert summary["tool_calls"] and summary["tool_calls"][0]["tool"] == "calculate", summary
    first = summary["tool_calls"][0]
    assert isinstance(first["arguments"]["expression"], str)  # the grammar's promise: a valid call
    assert result.content[0].text  # the answer, or why the agent stopped
    assert result.is_error == (summary["status"] != "completed")


async def test_stdio_lists_tools_and_calls_calculate():
    async with stdio_session() as session:
        await check_tools_and_calculate(session)


async def test_streamable_http_lists_tools_and_calls_calculate(http_url):
    async with http_session(http_url) as session:
        await check_tools_and_calculate(session)


@pytest.mark.e2e
async def test_stdio_agent_run():
    async with stdio_session() as session:
        await check_agent_run(session)


@pytest.mark.e2e
async def test_streamable_http_agent_run(http_url):
    async with http_session(http_url) as session:
        await check_agent_run(session)
