"""`agentrt bench engine --scale`: what `LocalLLM(path)` gives at real model sizes, per model, each
measure in a fresh process: first load (empty cache: header and packing), second load (the packed
cache mapped), decode ms/token after a short prompt and after a 2,048-token one (where reading the KV
cache adds to reading the weights), 512- and 2,048-token prefill tokens/s, peak RSS, and the memory
bandwidth floor of decode (weight bytes one step reads / the bandwidth measured here), beside
llama.cpp on the same file when ``llama-cpp-python`` is installed.

Like for like with llama.cpp: both hold KV for the same ``context_tokens`` (llama.cpp's ``n_ctx``;
our pool sized to those tokens, where `LocalLLM` would reserve 1 GiB and fill it as prefixes are
cached), decode is timed per forward step (our prompt-lookup speculation off: on random weights the
text repeats and drafts would be accepted as they never are on a real model), and llama.cpp's process
tokenizes with llama.cpp itself (no transformers or torch in its peak RSS).

Models: GGUF paths or ``synthetic:<size>[:<mix>]`` (random weights of real shapes: speed and memory,
never accuracy; see `synthetic`).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

PREFILLS = (512, 2048)


def context_tokens(decode_tokens: int) -> int:
    """KV capacity of both sides: the longest prompt, the decoded tokens and a margin."""
    return max(PREFILLS) + decode_tokens + 64


@dataclass
class ScaleRow:
    model: str
    impl: str  # "agentrt default" or "llama.cpp"
    file_mb: float
    first_load_s: float | None
    second_load_s: float | None
    decode_ms_per_token: float
    decode_ms_per_token_long: float  # after a max(PREFILLS)-token prompt
    prefill_tokens_per_s: dict[str, float]
    peak_rss_mb: float
    weight_mb: float
    floor_ms_per_token: float
    path: str = ""


def _child(path: str, impl: str, threads: int, repeats: int, decode_tokens: int, measure: bool) -> dict[str, Any]:
    """Runs in the fresh process: load (timed after the imports), then the speed measures."""
    from agentrt.benchmarks.prompts import text_token_ids

    out: dict[str, Any] = {}
    if impl == "agentrt":
        import agentrt.engine  # noqa: F401 - torch and the engine's imports, outside the timed load
        from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
        from agentrt.engine.decode_fused import load_extension

        load_extension()
        ctx = context_tokens(decode_tokens)
        config = EngineConfig(model=path, num_threads=threads, max_model_len=ctx, num_speculative_tokens=0)
        config = replace(config, num_kv_blocks=-(-ctx // config.block_size))
        t0 = time.perf_counter()
        eng = LLMEngine(config)
        out["load_s"] = time.perf_counter() - t0
        out["path"], out["weight_bytes"] = eng.runner.describe(), eng.decode_weight_bytes()
        tok, vocab = eng.tokenizer, eng.vocab_size

        def prefill(ids: list[int]) -> float:
            t = time.perf_counter()
            eng.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
            return time.perf_counter() - t

        def decode(ids: list[int]) -> float:  # seconds per token after the prompt ``ids``
            o = eng.generate([ids], SamplingParams(max_tokens=decode_tokens, ignore_eos=True))[0]
            return o.metrics.decode_s / max(1, o.metrics.completion_tokens - 1)
    else:
        import llama_cpp

        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                              n_ctx=context_tokens(decode_tokens), n_batch=512, verbose=False)
        out["load_s"] = time.perf_counter() - t0
        out["path"], out["weight_bytes"] = f"llama-cpp-python {llama_cpp.__version__}", os.path.getsize(path)
        vocab = llm.n_vocab()

        def tok(text: str) -> Any:  # the `text_token_ids` interface, on llama.cpp's own tokenizer
            return types.SimpleNamespace(input_ids=llm.tokenize(text.encode(), add_bos=True))

        def prefill(ids: list[int]) -> float:
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            return time.perf_counter() - t

        def decode(ids: list[int]) -> float:
            llm.reset()
            llm.eval(ids)
            t = time.perf_counter()
            for i in range(decode_tokens - 1):
                llm.eval([ids[i % len(ids)]])
            return (time.perf_counter() - t) / (decode_tokens - 1)
    if measure:
        seeds = iter(range(1000))
        decode(text_token_ids(tok, 32, next(seeds), vocab))  # warm-up: pages of a mapped cache, allocator
        out["decode_s"] = statistics.median(decode(text_token_ids(tok, 32, next(seeds), vocab)) for _ in range(repeats))
        out["decode_long_s"] = decode(text_token_ids(tok, max(PREFILLS), next(seeds), vocab))  # one run: 2K prefills are slow
        out["prefill_tps"] = {str(n): n / statistics.median(prefill(text_token_ids(tok, n, next(seeds), vocab))
                                                            for _ in range(repeats)) for n in PREFILLS}
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, its own memory map's high-water mark (ru_maxrss of a process started
    by fork + exec begins at the parent's RSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _spawn(path: str, impl: str, cache: str, threads: int, repeats: int, decode_tokens: int,
           measure: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "agentrt.benchmarks.scale", path, impl, str(threads), str(repeats),
           str(decode_tokens), "1" if measure else "0"]
    proc = subprocess.run(cmd, env={**os.environ, "AGENTRT_CACHE": cache}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} on {path} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scale(models: list[str], threads: int, repeats: int, decode_tokens: int, bandwidth_gbs: float,
              log: Callable[[str], None], llamacpp: bool = True) -> list[ScaleRow]:
    """One row per model for agentrt's default engine (and llama.cpp where installed, unless not ``llamacpp``)."""
    from agentrt.benchmarks.synthetic import synthetic_model

    impls = ["agentrt"]
    try:
        import llama_cpp  # noqa: F401
        impls += ["llama.cpp"] if llamacpp else []
    except ImportError:
        pass
    rows = []
    for spec in models:
        path = str(synthetic_model(spec)) if spec.startswith("synthetic:") else spec
        for impl in impls:
            with tempfile.TemporaryDirectory(prefix="agentrt-scale-") as cache:  # a fresh header/packed cache
                log(f"{spec}: {impl} first load ...")
                first = _spawn(path, impl, cache, threads, repeats, decode_tokens, measure=False)
                log(f"{spec}: {impl} second load and speed ...")
                m = _spawn(path, impl, cache, threads, repeats, decode_tokens, measure=True)
            wb = m["weight_bytes"]
            rows.append(ScaleRow(
                model=spec, impl="agentrt default" if impl == "agentrt" else impl,
                file_mb=os.path.getsize(path) / 1e6, first_load_s=first["load_s"], second_load_s=m["load_s"],
                decode_ms_per_token=m["decode_s"] * 1e3, decode_ms_per_token_long=m["decode_long_s"] * 1e3,
                prefill_tokens_per_s=m["prefill_tps"],
                peak_rss_mb=max(first["peak_rss_bytes"], m["peak_rss_bytes"]) / 1e6, weight_mb=wb / 1e6,
                floor_ms_per_token=wb / bandwidth_gbs / 1e6, path=m["path"]))
    return rows


def print_rows(rows: list[ScaleRow], bandwidth_gbs: float) -> None:
    print(f"scale (each figure from a fresh process; floor = weight bytes per step / {bandwidth_gbs:.1f} GB/s "
          "measured here; both sides hold KV for the same tokens, llama.cpp's n_ctx; decode ms per forward "
          "step, our speculation off)")
    head = ("model", "impl", "file MB", "1st load s", "2nd load s", "decode ms/tok", "floor ms", "x floor",
            f"decode ms/tok after {max(PREFILLS)}",
            *(f"prefill {n} tok/s" for n in PREFILLS), "peak RSS MB")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r.model, r.impl, f"{r.file_mb:.0f}", f"{r.first_load_s:.1f}", f"{r.second_load_s:.2f}",
                          f"{r.decode_ms_per_token:.1f}", f"{r.floor_ms_per_token:.1f}",
                          f"{r.decode_ms_per_token / r.floor_ms_per_token:.2f}", f"{r.decode_ms_per_token_long:.1f}",
                          *(f"{r.prefill_tokens_per_s[str(n)]:.0f}" for n in PREFILLS), f"{r.peak_rss_mb:.0f}"]))
        print(f"    {r.path}")


def to_json(rows: list[ScaleRow], bandwidth_gbs: float) -> dict[str, Any]:
    return {"bandwidth_gbs_measured": bandwidth_gbs, "rows": [asdict(r) for r in rows]}


if __name__ == "__main__":  # the fresh process `_spawn` starts
    a = sys.argv[1:]
    print(json.dumps(_child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5] == "1")))
