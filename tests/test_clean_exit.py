"""Programs that use the in-process engine end cleanly: exit code 0 and nothing from the C++ runtime
on stderr (a loop thread left running at interpreter exit used to abort the process with
"terminate called without an active exception", exit code 134)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

THREE_LINES = """
import asyncio
from agentrt.llm import LocalLLM
print(asyncio.run(LocalLLM().complete([{"role": "user", "content": "Say hi."}])).text)
"""


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "terminate" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.e2e
def test_a_three_line_local_llm_script_exits_0():
    proc = _run(["-c", THREE_LINES])
    _assert_clean(proc)
    assert proc.stdout.strip()  # it did generate


@pytest.mark.e2e
@pytest.mark.parametrize("example", ["langchain_tool_loop.py", "langgraph_react_agent.py"])
def test_the_langchain_examples_exit_0(example):
    pytest.importorskip("langchain_core", reason="langchain-core (the 'langchain' extra) is not installed")
    if example.startswith("langgraph"):
        pytest.importorskip("langgraph", reason="langgraph (dev extra) is not installed")
    proc = _run([str(ROOT / "examples" / example), "What is 6 times 7?"])
    _assert_clean(proc)
    assert "answer:" in proc.stdout or "no answer within" in proc.stdout


@pytest.mark.e2e
def test_serve_stops_on_sigterm_after_finishing_the_stream_in_flight():
    import signal
    import time

    import httpx

    from tests.helpers.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agentrt.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                time.sleep(0.3)
        lines: list[str] = []
        body = {"messages": [{"role": "user", "content": "Count from one to fifty in words."}], "max_tokens": 64,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if sum(bool(x) for x in lines) == 3:  # mid-stream
                    proc.send_signal(signal.SIGTERM)
        events = [x for x in lines if x]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "' in events[-2], events[-3:]
        assert proc.wait(timeout=60) == 0
        assert not proc.stderr.read().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
