"""The pieces of `agentrt bench server` and `agentrt serve` that need no model."""
from __future__ import annotations

import argparse
import os

from agentrt.benchmarks import server as bench
from agentrt.cli import build_parser
from agentrt.commands import serve


def test_percentiles_and_summary():
    assert bench._pct([], 50) is None
    assert bench._pct([3.0, 1.0, 2.0], 50) == 2.0
    assert bench._pct([float(i) for i in range(1, 101)], 95) == 95.0
    samples = [bench.Sample("agent", True, 2.0, [0.5, 0.1], steps=3),
               bench.Sample("agent", False, 9.0, error="HTTP 500: boom"),
               bench.Sample("chat", True, 1.0, [0.2])]
    res = bench.summarise(samples, wall_s=4.0)
    assert res["requests"] == 3 and res["errors"] == 1 and res["requests_per_s"] == 0.75
    assert res["agent"]["latency_p50_s"] == 2.0 and res["agent"]["ttft_p95_s"] == 0.5
    assert res["agent"]["mean_steps"] == 3.0 and res["chat"]["ttft_p50_s"] == 0.2
    assert res["first_errors"] == ["HTTP 500: boom"]


def test_peak_rss_of_this_process():
    rss = bench.peak_rss_mb(os.getpid())
    assert rss is not None and rss > 10
    assert bench.peak_rss_mb(2**22 + 12345) is None


def test_bench_and_serve_arguments():
    args = build_parser(["bench", "server", "--quick"]).parse_args(["bench", "server", "--quick"])
    assert args.quick and args.clients == 16 and args.agent_runs == 32
    argv = ["serve", "--port", "8123", "--api-key", "a", "--remote-url", "http://gpu:8000/v1", "--files-root", "/srv"]
    args = build_parser(argv).parse_args(argv)
    assert args.port == 8123 and args.remote_url == "http://gpu:8000/v1" and args.files_root == "/srv"
    os.environ["AGENTRT_API_KEYS"] = "b, c"
    try:
        assert serve.api_keys(args) == ["a", "b", "c"]
    finally:
        del os.environ["AGENTRT_API_KEYS"]


def test_serve_refuses_bad_arguments(capsys):
    base = dict(host="127.0.0.1", port=8000, model=None, model_name=None, tools=None, api_key=None,
                remote_url=None, remote_api_key=None, files_root=None, max_concurrent=4, max_queue=4, max_body_bytes=1000,
                log_level="warning")
    assert serve.main(argparse.Namespace(**{**base, "port": 0})) == 2
    assert serve.main(argparse.Namespace(**{**base, "model": "/nonexistent/model.gguf"})) == 2
    assert serve.main(argparse.Namespace(**{**base, "model": __file__, "remote_url": "http://x"})) == 2
    assert serve.main(argparse.Namespace(**{**base, "files_root": "/nonexistent/dir"})) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "does not exist" in err and "not both" in err and "not a folder" in err


def test_default_server_tools_read_no_files(tmp_path):
    from agentrt.server import default_server_registry

    safe = default_server_registry()
    assert "calculate" in safe and "read_file" not in safe and "list_files" not in safe
    assert "query_data" not in safe
    with_files = default_server_registry(str(tmp_path))
    assert "read_file" in with_files and set(safe.names) < set(with_files.names)
