"""The command line's outside-world flags as a user runs them: `agentrt run --mcp` (scripted model, real
MCP server), `agentrt serve --mcp` (a real server process, its MCP server stopped with it) and
`agentrt run --otel-endpoint` exporting spans to an OTLP/HTTP collector on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import agentrt.llm
from agentrt.cli import main as cli_main
from agentrt.testing import ScriptedLLM
from tests.helpers.server import free_port

pytest.importorskip("mcp", reason="MCP support is the optional 'mcp' extra")
pytest.importorskip("mcp_server_time", reason="the real MCP server under test (PyPI mcp-server-time) is not installed")

TIMEZONE = "Etc/GMT-7"  # also marks this file's server processes among the machine's


def time_server(tz: str = TIMEZONE) -> str:
    return f"{sys.executable} -m mcp_server_time --local-timezone {tz}"


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_run_mcp_offers_the_servers_tools_and_only_them(monkeypatch, capsys):
    llm = ScriptedLLM([{"calls": [{"tool": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}]},
                       {"answer": "done"}])
    monkeypatch.setattr(agentrt.llm, "LocalLLM", lambda model=None, **overrides: llm)
    code = cli_main(["run", "What time is it in Tokyo?", "--mcp", time_server(), "--json"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    result = next(e["result"] for e in events if e["type"] == "tool_result")
    assert not result["is_error"] and json.loads(result["content"])["timezone"] == "Asia/Tokyo"
    offered = json.dumps(llm.calls[0][1])  # the step's grammar: the MCP tools, no built-in ones
    assert "get_current_time" in offered and "convert_time" in offered and "calculate" not in offered
    assert not processes_with(TIMEZONE)  # closed with the run


def test_run_mcp_that_cannot_start_exits_2(capsys):
    assert cli_main(["run", "q", "--mcp", "no-such-mcp-server-cmd"]) == 2
    assert "--mcp: MCP server 'no-such-mcp-server-cmd'" in capsys.readouterr().err


@pytest.mark.e2e
def test_serve_mcp_runs_the_servers_tools_and_stops_it_on_shutdown():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agentrt.cli", "serve", "--port", str(port), "--mcp", time_server()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get("/health").json()["status"] == "ok":
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
                time.sleep(0.3)
            body = {"task": "What time is it in Tokyo (Asia/Tokyo)?", "tool_choice": "get_current_time",
                    "max_steps": 2, "parallel_tool_calls": False}
            run = client.post("/agent/run", json=body)
            assert run.status_code == 200, run.text
            first = run.json()["steps"][0]
            assert first["calls"][0]["name"] == "get_current_time"
            reply = first["results"][0]["content"]
            assert "datetime" in reply or "MCPToolError" in reply, reply  # the MCP server's own answer
        assert processes_with(TIMEZONE)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    deadline = time.monotonic() + 10
    while processes_with(TIMEZONE) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(TIMEZONE)


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace collector: keeps the spans' names and attributes."""

    spans: list[tuple[str, dict]] = []

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: a.value.WhichOneof("value") and getattr(a.value, a.value.WhichOneof("value"))
                             for a in span.attributes}
                    type(self).spans.append((span.name, attrs))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.e2e
def test_run_otel_endpoint_exports_the_runs_spans():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the OTLP exporter is the 'otel' extra")
    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        done = subprocess.run(
            [sys.executable, "-m", "agentrt.cli", "run", "What is 6*7?", "--only", "calculate", "--max-steps", "2",
             "--max-tokens", "48", "--otel-endpoint", f"http://127.0.0.1:{collector.server_port}"],
            capture_output=True, text=True, timeout=300, env=env)
    finally:
        collector.shutdown()
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: the small model ran out of steps
    names = [name for name, _ in Collector.spans]
    assert "invoke_agent agent" in names and "agentrt.step 1" in names and "execute_tool calculate" in names
    chat = next(attrs for name, attrs in Collector.spans if name.startswith("chat "))
    assert chat["gen_ai.operation.name"] == "chat" and chat["gen_ai.usage.input_tokens"] > 0
    assert "agentrt.ttft_s" in chat and "agentrt.usage.cached_tokens" in chat
