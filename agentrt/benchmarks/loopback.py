"""Shared by the loopback benchmarks (`agentrt bench server`, its ``--soak``): an ``agentrt serve``
child process on 127.0.0.1, its memory, its Prometheus samples, and the jobs' request bodies."""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                "country": {"type": "string"}},
               "required": ["city", "country"], "additionalProperties": False}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Perth"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A memory ``field`` of a live process's /proc status (VmRSS: resident now; VmHWM: its peak), in
    MiB; None when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set (VmHWM) of a live process, in MiB (Linux)."""
    return memory_mb(pid, "VmHWM")


@contextmanager
def serve_process(extra: list[str], timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``agentrt serve`` on a free loopback port; yield (base URL, process); stop it."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "agentrt.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra]
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return httpx.get(url + "/health", timeout=2).json().get("status") == "ok"

    with server_process(cmd, ready, "agentrt serve", timeout_s) as proc:
        yield url, proc


@contextmanager
def server_process(cmd: list[str], ready: Callable[[], bool], name: str, timeout_s: float
                   ) -> Iterator[subprocess.Popen]:
    """Start ``cmd``; yield its process once ``ready()`` (connection errors count as not yet);
    terminate it at the end (kill after 30 s)."""
    import httpx

    # stderr to a file, not a pipe nobody reads while it runs: a chatty server (llama.cpp logs its
    # whole model load) would fill the pipe and block
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                if ready():
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not become ready within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def metric_samples(url: str, name: str) -> dict[str, float]:
    """The samples of one Prometheus metric on the server: {its label values (or ""): value}."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            key, _, value = line.rpartition(" ")
            out[",".join(re.findall(r'"([^"]*)"', key[len(name):]))] = float(value)  # label values
    return out
