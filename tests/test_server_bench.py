"""The pieces of `agentrt bench server` and `agentrt serve` that need no model."""
from __future__ import annotations

import argparse
import os

import anyio
import httpx
import pytest

from agentrt.benchmarks import loopback
from agentrt.benchmarks import server as bench
from agentrt.cli import build_parser
from agentrt.commands import serve


def test_percentiles_and_summary():
    assert loopback.pct([], 50) is None
    assert loopback.pct([3.0, 1.0, 2.0], 50) == 2.0
    assert loopback.pct([float(i) for i in range(1, 101)], 95) == 95.0
    samples = [bench.Sample("agent", "", 2.0, [0.5, 0.1], steps=3, outcome="completed"),
               bench.Sample("agent", "http", 9.0, error="HTTP 500: boom"),
               bench.Sample("agent", "run", 4.0, [0.3], error="run status error: cut", steps=1, outcome="error"),
               bench.Sample("chat", "", 1.0, [0.2], outcome="tool_calls"),
               bench.Sample("chat", "output", 1.5, [0.4], error="invalid output", outcome="stop")]
    res = bench.summarise(samples, wall_s=5.0)
    assert res["requests"] == 5 and res["requests_per_s"] == 1.0
    assert (res["errors"], res["http_errors"], res["agent_run_errors"], res["invalid_outputs"]) == (3, 1, 1, 1)
    agent, chat = res["agent"], res["chat"]
    assert (agent["errors"], agent["http_errors"], agent["agent_run_errors"]) == (2, 1, 1)
    assert agent["outcomes"] == {"completed": 1, "error": 1} and chat["outcomes"] == {"stop": 1, "tool_calls": 1}
    assert agent["latency_p50_s"] == 2.0 and agent["ttft_p95_s"] == 0.5  # served requests only
    assert agent["mean_steps"] == 3.0 and chat["ttft_p50_s"] == 0.2 and chat["invalid_outputs"] == 1
    assert res["first_errors"] == ["agent: HTTP 500: boom", "agent: run status error: cut", "chat: invalid output"]


def test_slowest_runs_split_their_time():
    fast = bench.Sample("agent", "", 2.0, run_s=2.0, trace=[(100, 0, 10, 0.5, 1.0, 0.1)])
    slow = bench.Sample("agent", "run", 9.0, run_s=9.0, outcome="budget_exceeded",
                        trace=[(100, 0, 10, 1.0, 2.0, 0.5), (150, 110, 20, 3.0, 1.5, 0.0)])
    runs = bench.slowest_runs([fast, slow], n=1)
    assert len(runs) == 1 and runs[0]["run_s"] == 9.0 and runs[0]["status"] == "budget_exceeded"
    assert runs[0]["other_s"] == 1.0  # 9 s minus 8 s inside steps
    assert runs[0]["steps"][1] == {"prompt": 150, "cached": 110, "completion": 20, "ttft_s": 3.0,
                                   "decode_s": 1.5, "tool_s": 0.0}


class FakeHTTP:
    """Answers ``post`` with one canned response (an httpx.Response)."""

    def __init__(self, status: int, body: dict):
        self.response = httpx.Response(status, json=body)

    async def post(self, path: str, json: dict) -> httpx.Response:
        return self.response


@pytest.mark.parametrize("status,body,failure,outcome", [
    (200, {"status": "completed", "steps": [{"ttft_s": 0.1}, {"ttft_s": 0.05}]}, "", "completed"),
    (200, {"status": "max_steps", "steps": [{"ttft_s": 0.1}]}, "", "max_steps"),
    (200, {"status": "error", "error": "cut at max_tokens",
           "steps": [{"ttft_s": 0.1, "finish_reason": "length", "error": "unterminated string"}]}, "run", "error"),
    (200, {"status": "completed", "steps": []}, "run", "completed"),
    (200, {"status": "budget_exceeded", "error": "run time limit", "steps": [{"ttft_s": 9.0}]}, "run", "budget_exceeded"),
    (429, {"error": {"message": "busy"}}, "http", ""),
])
def test_agent_job_tells_http_errors_from_failed_runs(status, body, failure, outcome):
    sample = anyio.run(bench.agent_job, FakeHTTP(status, body), 0, 3)
    assert (sample.failure, sample.outcome) == (failure, outcome), sample
    if failure == "run":
        assert "run status" in sample.error
    if failure == "http":
        assert sample.error.startswith("HTTP 429")


def test_chat_output_is_checked_against_the_grammar_it_promises():
    tools = {"tools": [bench.WEATHER]}
    fmt = {"response_format": {"json_schema": {"schema": bench.CITY_SCHEMA}}}
    good = {0: {"name": "get_weather", "args": '{"city":"Oslo","unit":"celsius"}'}}
    assert bench.check_chat_output(tools, "tool_calls", "", good) == ""
    assert "ValidationError" in bench.check_chat_output(
        tools, "tool_calls", "", {0: {"name": "get_weather", "args": '{"city":"Oslo","unit":"kelvin"}'}})
    assert "JSONDecodeError" in bench.check_chat_output(tools, "tool_calls", "", {0: {"name": "get_weather",
                                                                                        "args": '{"city":'}})
    assert "0 call(s)" in bench.check_chat_output(tools, "stop", "hello", {})
    assert bench.check_chat_output(fmt, "stop", '{"city":"Oslo","country":"Norway"}', {}) == ""
    assert bench.check_chat_output(fmt, "stop", '{"city":"Oslo"}', {}) != ""
    assert bench.check_chat_output(fmt, "length", '{"city":"Os', {}) == ""  # cut replies say so themselves


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
                log_level="warning", public_docs=False, quantization=None, threads=None, max_model_len=None,
                kv_cache_gb=None, kv_cache_dtype="auto")
    assert serve.main(argparse.Namespace(**{**base, "port": 0})) == 2
    assert serve.main(argparse.Namespace(**{**base, "model": "/nonexistent/model.gguf"})) == 2
    assert serve.main(argparse.Namespace(**{**base, "model": __file__, "remote_url": "http://x"})) == 2
    assert serve.main(argparse.Namespace(**{**base, "files_root": "/nonexistent/dir"})) == 2
    assert serve.main(argparse.Namespace(**{**base, "remote_url": "http://x", "quantization": "int4"})) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "does not exist" in err and "not both" in err and "not a folder" in err
    assert "--remote-url has none" in err


def test_engine_flags_become_engine_config_overrides():
    from agentrt.commands.engine_options import engine_overrides
    from agentrt.engine import EngineConfig

    argv = ["serve", "--quantization", "int4", "--threads", "2", "--max-model-len", "4096", "--kv-cache-gb", "0.5",
            "--kv-cache-dtype", "float32"]
    overrides = engine_overrides(build_parser(argv).parse_args(argv))
    assert overrides == {"quantization": "int4", "dtype": "float32", "fused_decode": True, "num_threads": 2,
                         "max_model_len": 4096, "kv_cache_gb": 0.5, "kv_cache_dtype": "float32"}
    EngineConfig(**overrides)  # a valid config
    argv = ["run", "q"]
    assert engine_overrides(build_parser(argv).parse_args(argv)) == {}


def test_default_server_tools_read_no_files(tmp_path):
    from agentrt.server import default_server_registry

    safe = default_server_registry()
    assert "calculate" in safe and "read_file" not in safe and "list_files" not in safe
    assert "query_data" not in safe
    with_files = default_server_registry(str(tmp_path))
    assert "read_file" in with_files and set(safe.names) < set(with_files.names)


@pytest.mark.e2e
def test_soak_smoke_on_the_embedded_model():
    """A short soak: hostile requests beside normal ones on a real server get no 5xx, and the server is
    idle afterwards (the timing targets need the full length: `agentrt bench server --soak`)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agentrt.cli", "bench", "server", "--soak", "--minutes", "0.25",
                           "--clients", "2", "--hostile-clients", "2", "--json"],
                          capture_output=True, text=True, timeout=900)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["hostile_requests"] >= 10 and report["normal_requests"] >= 2, report
    assert report["server_5xx"] == 0, report["first_5xx"]
    assert report["normal_failed"] == 0 and not report["reference_failures"], report["first_harmed"]
    assert not any(report["after"].values()), report["after"]
    assert report["grammar_cache_peak_mb"] <= report["grammar_cache_cap_mb"]
    assert report["compile_memory_peak_mb"] <= report["compile_memory_cap_mb"]
    assert set(report["hostile_by_status"]) <= {"0", "200", "400", "413", "429"}, report["hostile_by_status"]


@pytest.mark.parametrize("mix,quant_type,mode", [("q4_1", "Q4_1", "int4"), ("q4_k_m", "Q4_K", "int4"),
                                                  ("q5_k_m", "Q5_K", "int8")])
def test_synthetic_models_load_and_run_in_the_default_engine(ext, tmp_path, mix, quant_type, mode):
    """A random-weight Llama GGUF (a small shape here; the bench writes 1B/3B/8B ones) loads, reports its
    quant type, runs in the default (fused) engine and decodes finite logits."""
    import torch

    from agentrt.benchmarks.synthetic import _write, synthetic_model
    from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
    from agentrt.engine.loader import load_model

    path = tmp_path / f"tiny-{mix}.gguf"
    _write(path, dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, tied=mix == "q4_1"), mix, "tiny")
    loaded = load_model(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert loaded.quant_type == quant_type and loaded.config["hidden_size"] == 256
    eng = LLMEngine(EngineConfig(num_kv_blocks=32, max_model_len=256), loaded=loaded)
    assert eng.runner.fused is not None and eng.config.quantization == mode
    if mix == "q5_k_m":  # q/k, o, gate/up on int5 (5K/8 bytes of weights a row, super-block records), as stored
        w, s = eng.runner.fused.decoder.parts[0], eng.runner.fused.decoder.parts[1]
        assert w.dtype == s.dtype == torch.uint8 and w.shape[1] == 256 // 8 * 5
    assert torch.isfinite(eng.prompt_logits(list(range(5, 40)))).all()
    assert len(eng.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True))[0].output_token_ids) == 4
    with pytest.raises(ValueError, match="synthetic:<1b"):
        synthetic_model("synthetic:70b")
