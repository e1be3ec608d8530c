"""`agentrt bench engine`: our engine vs transformers and llama.cpp, side by side in one process.

Sections (same model, prompts and thread count for every implementation; medians over repeats):

* speed: decode ms/token and prefill tokens/s for ours (fp32, bf16, int8, int4 weight-only; int8/int4
  with every step, prefill chunks included, as one C++ call: ``int8-fused``, ``int4-fused`` with int8
  activations, ``int4-fused-a16`` with int16-like ones; their prefill split into linears / attention /
  the rest),
  transformers' ``generate`` with its own cache (fp32, bf16) and llama.cpp through
  ``llama-cpp-python`` on the same GGUF (when installed), each beside its memory-bandwidth
  floor (weight bytes read per token / measured read bandwidth);
* prefix cache: TTFT of a prompt whose first 90% is cached vs not cached;
* batching: aggregate decode tokens/s with 8 concurrent requests vs 1;
* accuracy of weight-only int8/int4 (and bf16) vs fp32: max logit diff and top-1 agreement
  (teacher-forced), greedy agreement over generated tokens;
* memory: peak RSS, and KV blocks still referenced after many requests finish (must be 0).

The transformers baseline is built from the very weights our loader produced (for the embedded
GGUF these are bit-identical to transformers' own GGUF loader; tests/test_loader.py checks that),
which saves a second 20 s GGUF parse.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from agentrt.benchmarks.prompts import text_token_ids

SETTINGS = {  # name -> EngineConfig fields
    # exactly what LocalLLM() builds (quantization "auto": a quantized GGUF in the fused C++ step)
    "default": dict(),
    "fp32": dict(dtype="float32", quantization=None),
    "bf16": dict(dtype="bfloat16", quantization=None),
    "int8": dict(dtype="bfloat16", quantization="int8"),
    "int4": dict(dtype="bfloat16", quantization="int4"),
    # int8 decode, dynamic int8 (W8A8) prefill chunks; float32 elsewhere (no native bf16 on most CPUs)
    "int8-w8a8": dict(dtype="float32", quantization="int8", prefill_int8=True),
    # every step (decode rows and prefill chunks) as one C++ call over the int8 weights (float32
    # activations rounded to int8 per block of 32 in the linears)
    "int8-fused": dict(dtype="float32", quantization="int8", fused_decode=True),
    # the same with int4 layers in groups of 32 (the GGUF's own Q4_1 grid: half the bytes of int8)
    "int4-fused": dict(dtype="float32", quantization="int4", fused_decode=True),
    # int4-fused with int16-like activations (int8 plus its rounding residual): float32's logits
    "int4-fused-a16": dict(dtype="float32", quantization="int4", fused_decode=True, fused_activations="int16"),
}

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write the JSON report to PATH")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (median; default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes and fewer settings: a smoke test")
    p.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M GGUF), or "
                   "synthetic:1b|3b|8b[:q4_1|q4_k_m|q5_k_m]: a random-weight Llama of that shape, written once (speed and "
                   "memory only)")
    p.add_argument("--settings", default=None,
                   help=f"comma list of our settings among {','.join(SETTINGS)} (default all; quick bf16,int8)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill length (default 1024; quick 128)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode run (default 64; quick 8)")
    p.add_argument("--requests", type=int, default=None, help="requests for the KV leak check (default 1000; quick 64)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even when installed")
    p.add_argument("--compile", action="store_true", help="also run our best setting with torch.compile")
    p.add_argument("--scale", action="store_true",
                   help="per model in --model (comma-separated; default synthetic:1b): first and second load, decode, "
                        "512/2048-token prefill, peak RSS and the bandwidth floor of what LocalLLM(path) builds, each "
                        "in a fresh process (beside llama.cpp when installed)")
    p.add_argument("--bandwidth-gbs", type=float, default=40.0,
                   help="memory read bandwidth for the decode floor (default 40, measured on the reference "
                        "machine when quiet; the bench also reports its own noisy measurement)")


@dataclass
class Sizes:
    prefill: int
    decode: int
    repeats: int
    requests: int
    ttft_prompt: int
    ttft_cached: int
    concurrency: int = 8
    accuracy_tokens: int = 256
    greedy_tokens: int = 32


@dataclass
class SpeedRow:
    impl: str
    setting: str
    decode_ms_per_token: float
    prefill_s: float
    prefill_tokens: int
    prefill_tokens_per_s: float
    weight_bytes: int
    floor_ms_per_token: float
    note: str = ""
    path: str = ""  # what ran the steps (ModelRunner.describe), e.g. for the default setting
    # a fused setting's prefill: median seconds in the C++ step's linears, attention and the rest
    prefill_split_s: dict[str, float] | None = None


@dataclass
class Report:
    model: str
    threads: int
    sizes: dict[str, int]
    bandwidth_gbs: float
    bandwidth_gbs_measured: float
    torch_version: str
    machine: str
    speed: list[SpeedRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    prefix_cache: dict[str, Any] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# helpers


def _median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def measure_bandwidth_gbs(threads: int) -> float:
    """Memory read bandwidth: the best of a few sums over a 512 MB buffer."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MB
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    n = x.numel() * x.element_size()
    del x
    return n / best / 1e9


def _module_bytes(model: Any) -> int:
    """Bytes of a model's weights read per decode step (unique params and buffers, rope tables excluded)."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or id(t) in seen or any(s in name for s in ("cos", "sin", "inv_freq", "rope")):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    if emb is not None and lm_head is not None and getattr(lm_head, "weight", None) is not emb.weight:
        total -= emb.weight.numel() * emb.weight.element_size()  # untied: one embedding row per token
    return total


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


# ----------------------------------------------------------------------------------------------
# ours


def _engine(loaded: Any, setting: str, threads: int, sizes: Sizes, *, caching: bool, compile: bool = False) -> Any:
    from agentrt.engine import EngineConfig, LLMEngine

    max_len = max(sizes.prefill, sizes.ttft_prompt) + sizes.decode + sizes.greedy_tokens + 64
    need = sizes.concurrency * (max_len + 16)
    # 64 sequences at once lets the many-short-requests check fill 512-token steps; decode is timed per forward
    # step, as llama.cpp's is, so prompt-lookup speculation is off (`bench grammar --e2e` measures it)
    cfg = EngineConfig(**SETTINGS[setting], num_threads=threads,
                       enable_prefix_caching=caching, max_model_len=max_len, num_kv_blocks=-(-need // 16) + 8,
                       compile=compile, max_num_seqs=64, num_speculative_tokens=0)
    return LLMEngine(cfg, loaded=loaded)


def _ours_speed(engine: Any, loaded: Any, sizes: Sizes, setting: str, bw: float) -> SpeedRow:
    import torch

    from agentrt.engine import SamplingParams

    vocab = engine.vocab_size
    seed = iter(range(10_000, 20_000))

    fused = getattr(engine, "_fused", None) if getattr(engine, "_fused_prefill", False) else None
    splits: list[list[float]] = []

    def prefill() -> float:
        ids = text_token_ids(engine.tokenizer, sizes.prefill, next(seed), vocab)
        if fused is not None:  # the C++ step adds each phase's seconds into this
            fused.timings = torch.zeros(3, dtype=torch.float64)
        t0 = time.perf_counter()
        engine.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
        dt = time.perf_counter() - t0
        if fused is not None:
            splits.append(fused.timings.tolist())
            fused.timings = None
        return dt

    def decode() -> float:
        ids = text_token_ids(engine.tokenizer, 32, next(seed), vocab)
        out = engine.generate([ids], SamplingParams(max_tokens=sizes.decode, ignore_eos=True))[0]
        return out.metrics.decode_s / max(1, out.metrics.completion_tokens - 1)

    prefill(), decode()  # warm-up (allocator, kernels, compile)
    splits.clear()
    p = _median(prefill, sizes.repeats)
    d = _median(decode, sizes.repeats)
    # the engine knows which copies a decode step reads (quantized decode copies, not dense prefill ones)
    wb = engine.decode_weight_bytes() if hasattr(engine, "decode_weight_bytes") else _module_bytes(engine.model)
    row = SpeedRow("agentrt", setting, d * 1e3, p, sizes.prefill, sizes.prefill / p, wb, wb / bw / 1e6,
                   path=engine.runner.describe())
    if splits:
        row.prefill_split_s = {k: statistics.median(s[i] for s in splits)
                               for i, k in enumerate(("linears", "attention", "rest"))}
        row.note = "prefill through the C++ step"
    return row


def _prefix_cache(engine: Any, sizes: Sizes) -> dict[str, Any]:
    """TTFT of an N-token prompt whose first M tokens were computed by an earlier request, vs a fresh one."""
    from agentrt.engine import SamplingParams

    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    vocab = engine.vocab_size
    cached, uncached, reported = [], [], []
    for r in range(sizes.repeats + 1):  # the first round warms up
        full = text_token_ids(engine.tokenizer, sizes.ttft_prompt, 50_000 + r, vocab)
        engine.generate([full[:sizes.ttft_cached]], sp)  # puts the shared prefix in the cache
        out = engine.generate([full], sp)[0]
        fresh = engine.generate([text_token_ids(engine.tokenizer, sizes.ttft_prompt, 60_000 + r, vocab)], sp)[0]
        if r:
            cached.append(out.metrics.ttft_s)
            uncached.append(fresh.metrics.ttft_s)
            reported.append(out.metrics.cached_tokens)
    c, u = statistics.median(cached), statistics.median(uncached)
    return {"prompt_tokens": sizes.ttft_prompt, "shared_prefix_tokens": sizes.ttft_cached,
            "cached_tokens_reported": int(statistics.median(reported)), "ttft_uncached_s": u, "ttft_cached_s": c,
            "speedup": u / c, "target": 5.0}


def _batching(engine: Any, sizes: Sizes) -> dict[str, Any]:
    """Aggregate decode tokens/s with ``concurrency`` requests in flight vs one (prefill excluded)."""
    from agentrt.engine import SamplingParams

    vocab = engine.vocab_size
    n_tok = max(sizes.decode, 16)

    def run(k: int, seed: int) -> float:
        ids = [engine.add_request(text_token_ids(engine.tokenizer, 32, seed + i, vocab),
                                  SamplingParams(max_tokens=n_tok, ignore_eos=True)) for i in range(k)]
        counts = {i: 0 for i in ids}
        done: set[str] = set()
        t0 = None
        base = 0
        while len(done) < k:
            for out in engine.step():
                if out.request_id in counts:
                    counts[out.request_id] = len(out.output_token_ids)
                    if out.finished:
                        done.add(out.request_id)
            if t0 is None and all(counts.values()):  # every request is past its prefill
                t0, base = time.perf_counter(), sum(counts.values())
        return (sum(counts.values()) - base) / (time.perf_counter() - t0)

    run(1, 70_000)  # warm-up
    one = _median(lambda: run(1, 71_000), sizes.repeats)
    many = _median(lambda: run(sizes.concurrency, 72_000), sizes.repeats)
    return {"concurrency": sizes.concurrency, "tokens_per_s_1": one, f"tokens_per_s_{sizes.concurrency}": many,
            "speedup": many / one, "target": 3.0}


def _leak_check(engine: Any, sizes: Sizes) -> dict[str, Any]:
    """Run many short requests to completion; afterwards no KV block may still be referenced."""
    from agentrt.engine import SamplingParams

    vocab = engine.vocab_size
    prompts = [text_token_ids(engine.tokenizer, 8 + i % 24, 80_000 + i, vocab) for i in range(sizes.requests)]
    t0 = time.perf_counter()
    for i in range(0, len(prompts), 64):
        engine.generate(prompts[i:i + 64], SamplingParams(max_tokens=2, ignore_eos=True))
    st = engine.stats()
    return {"requests": sizes.requests, "seconds": time.perf_counter() - t0, "kv_blocks_total": st.kv_blocks_total,
            "kv_blocks_referenced_after": st.kv_blocks_used, "kv_blocks_cached_after": st.kv_blocks_cached,
            "waiting": st.waiting, "running": st.running}


def _accuracy(engines: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    """Each setting vs fp32: teacher-forced logits on a text, and greedy continuations of prompts."""

    from agentrt.engine import SamplingParams

    ref = engines["fp32"]
    ids = text_token_ids(ref.tokenizer, sizes.accuracy_tokens, 1, ref.vocab_size)
    prompts = [text_token_ids(ref.tokenizer, 24, 90_000 + i, ref.vocab_size) for i in range(4)]
    sp = SamplingParams(max_tokens=sizes.greedy_tokens, ignore_eos=True)
    # 16-token chunks: quantized engines run their decode kernels (the path whose accuracy matters)
    ref_logits = ref.prompt_logits(ids, chunk_size=16)
    ref_prefill = ref.prompt_logits(ids, chunk_size=len(ids))
    ref_out = [o.output_token_ids for o in ref.generate(prompts, sp)]
    rows = []
    for name, eng in engines.items():
        if name == "fp32":
            continue
        # a fused engine's decode path is its C++ step over one row per sequence: teacher-force one token a step
        lg = eng.prompt_logits(ids, chunk_size=1 if getattr(eng, "_fused", None) is not None else 16)
        diff = (lg - ref_logits).abs()
        # one prefill chunk of all the tokens: the path W8A8 prefill changes (16-row chunks never reach it),
        # and a fused engine's C++ step over many rows
        lp = eng.prompt_logits(ids, chunk_size=len(ids))
        outs = [o.output_token_ids for o in eng.generate(prompts, sp)]
        same = sum(a == b for x, y in zip(outs, ref_out) for a, b in zip(x, y))
        prefix = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(outs, ref_out)]
        rows.append({"setting": name, "vs": "fp32", "tokens": len(ids), "max_abs_logit_diff": diff.max().item(),
                     "mean_abs_logit_diff": diff.mean().item(),
                     "ref_logit_range": (ref_logits.max() - ref_logits.min()).item(),
                     "top1_agreement": (lg.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                     "prefill_top1_agreement": (lp.argmax(-1) == ref_prefill.argmax(-1)).float().mean().item(),
                     "prefill_max_abs_logit_diff": (lp - ref_prefill).abs().max().item(),
                     "greedy_agreement": same / sum(len(x) for x in ref_out),
                     "greedy_identical_prefix_mean": statistics.mean(prefix), "greedy_tokens": sizes.greedy_tokens,
                     "greedy_prompts": len(prompts)})
        del lg, diff
    return rows


# ----------------------------------------------------------------------------------------------
# baselines


def _transformers_speed(loaded: Any, dtype_name: str, sizes: Sizes, bw: float, tokenizer: Any) -> SpeedRow:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = {k: v for k, v in loaded.config.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf_cfg = AutoConfig.for_model(loaded.config["model_type"], **cfg)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.load_state_dict(loaded.weights, strict=False)
    model.tie_weights()
    model = model.to(dtype).eval()
    vocab = model.config.vocab_size
    seed = iter(range(30_000, 40_000))
    eos = loaded.eos_token_ids[0]

    def gen(ids: list[int], n: int) -> float:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=eos)
        return time.perf_counter() - t0

    def prefill() -> float:
        return gen(text_token_ids(tokenizer, sizes.prefill, next(seed), vocab), 1)

    def decode() -> float:
        ids = text_token_ids(tokenizer, 32, next(seed), vocab)
        return (gen(ids, sizes.decode) - gen(ids, 1)) / (sizes.decode - 1)

    prefill(), decode()
    p = _median(prefill, sizes.repeats)
    d = _median(decode, sizes.repeats)
    wb = _module_bytes(model)
    model = None  # frees the weights before the next setting loads its own
    gc.collect()
    return SpeedRow("transformers", dtype_name, d * 1e3, p, sizes.prefill, sizes.prefill / p, wb, wb / bw / 1e6,
                    "model.generate, its own DynamicCache")


def _llamacpp_speed(gguf_path: str, threads: int, sizes: Sizes, bw: float, tokenizer: Any, vocab: int) -> SpeedRow:
    import os

    import llama_cpp

    n_ctx = max(sizes.prefill, 64) + sizes.decode + 64
    llm = llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=512, verbose=False)
    seed = iter(range(40_000, 50_000))

    def prefill() -> float:
        ids = text_token_ids(tokenizer, sizes.prefill, next(seed), vocab)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t0

    def decode() -> float:
        ids = text_token_ids(tokenizer, 32, next(seed), vocab)
        llm.reset()
        llm.eval(ids)
        t0 = time.perf_counter()
        for i in range(sizes.decode - 1):  # one token per eval = one decode step (token choice is irrelevant)
            llm.eval([ids[i % len(ids)]])
        return (time.perf_counter() - t0) / (sizes.decode - 1)

    prefill(), decode()
    p = _median(prefill, sizes.repeats)
    d = _median(decode, sizes.repeats)
    wb = os.path.getsize(gguf_path)
    llm = None  # frees llama.cpp's context before the next setting
    gc.collect()
    return SpeedRow("llama.cpp", "gguf", d * 1e3, p, sizes.prefill, sizes.prefill / p, wb, wb / bw / 1e6,
                    f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, same GGUF file")


# ----------------------------------------------------------------------------------------------
# driver


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: None) -> Report:
    """Run every section and return the report (``main`` prints it)."""
    import torch

    from agentrt.engine.loader import load_model, resolve_source

    q = args.quick
    sizes = Sizes(
        prefill=args.prefill_tokens or (128 if q else 1024),
        decode=args.decode_tokens or (8 if q else 64),
        repeats=args.repeats or (1 if q else 3),
        requests=args.requests or (64 if q else 1000),
        ttft_prompt=200 if q else 1000,
        ttft_cached=180 if q else 900,
        accuracy_tokens=64 if q else 256,
        greedy_tokens=8 if q else 32,
    )
    if sizes.decode < 2:
        raise SystemExit("--decode-tokens must be >= 2")
    settings = [s.strip() for s in (args.settings or ("bf16,int8" if q else ",".join(SETTINGS))).split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}: choose among {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)

    if args.model and args.model.startswith("synthetic:"):
        from agentrt.benchmarks.synthetic import synthetic_model

        log(f"writing {args.model} (first use only) ...")
        args.model = str(synthetic_model(args.model))
    log("loading the model ...")
    src = resolve_source(args.model)
    loaded = load_model(args.model, progress=not args.json)
    bw = args.bandwidth_gbs
    rep = Report(model=loaded.name, threads=args.threads, sizes=asdict(sizes), bandwidth_gbs=bw,
                 bandwidth_gbs_measured=measure_bandwidth_gbs(args.threads),
                 torch_version=torch.__version__, machine=f"{platform.machine()} {platform.processor() or ''}".strip())

    def checkpoint() -> None:  # write what is measured so far: a long run killed midway still reports
        rep.targets = _targets(rep)
        rep.memory["peak_rss_mb_total"] = _peak_rss_mb()
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(asdict(rep), f, indent=2)

    # 1. speed, side by side: ours for every setting (engines kept for the accuracy section), then baselines
    engines: dict[str, Any] = {}
    for s in settings:
        log(f"agentrt {s}: speed ...")
        eng = _engine(loaded, s, args.threads, sizes, caching=False)
        rep.speed.append(_ours_speed(eng, loaded, sizes, s, bw))
        engines[s] = eng
        checkpoint()
    ours = [r for r in rep.speed if r.impl == "agentrt"]
    best = min(ours, key=lambda r: r.decode_ms_per_token)
    if args.compile:
        log(f"agentrt {best.setting}+compile: speed ...")
        eng = _engine(loaded, best.setting, args.threads, sizes, caching=False, compile=True)
        row = _ours_speed(eng, loaded, sizes, best.setting, bw)
        row.setting += "+compile"
        rep.speed.append(row)
        del eng
    if args.no_transformers:
        rep.skipped["transformers"] = "--no-transformers"
    else:
        for dt in (["bf16"] if q else ["fp32", "bf16"]):
            log(f"transformers {dt}: speed ...")
            rep.speed.append(_transformers_speed(loaded, dt, sizes, bw, loaded.tokenizer))
            checkpoint()
    gguf_path = str(src) if src.suffix == ".gguf" else None
    if args.no_llamacpp:
        rep.skipped["llama.cpp"] = "--no-llamacpp"
    elif gguf_path is None:
        rep.skipped["llama.cpp"] = "the model is not a GGUF file"
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            rep.skipped["llama.cpp"] = "llama-cpp-python is not installed (see README: benchmarking against llama.cpp)"
        else:
            log("llama.cpp: speed ...")
            rep.speed.append(_llamacpp_speed(gguf_path, args.threads, sizes, bw, loaded.tokenizer,
                                             loaded.config["vocab_size"]))
            checkpoint()

    # 2. prefix cache, batching and leaks on our best setting
    log(f"agentrt {best.setting}: prefix cache, batching, {sizes.requests} requests ...")
    eng = _engine(loaded, best.setting, args.threads, sizes, caching=True)
    rep.prefix_cache = {"setting": best.setting, **_prefix_cache(eng, sizes)}
    checkpoint()
    rep.batching = {"setting": best.setting, **_batching(eng, sizes)}
    checkpoint()
    rep.memory = {"setting": best.setting, **_leak_check(eng, sizes), "rss_mb_now": _rss_mb(),
                  "note": "rss_mb_now: with our engines alive (incl. the float32 weights as loaded)"}
    checkpoint()
    del eng

    # 3. accuracy vs fp32 (needs the fp32 engine)
    if "fp32" in engines and len(engines) > 1:
        log("accuracy vs fp32 ...")
        rep.accuracy = _accuracy(engines, sizes)
    else:
        rep.skipped["accuracy"] = "needs fp32 and another setting in --settings"
    engines.clear()
    gc.collect()
    checkpoint()
    return rep


def _targets(rep: Report) -> dict[str, Any]:
    ours = [r for r in rep.speed if r.impl == "agentrt"]
    best_dec = min(ours, key=lambda r: r.decode_ms_per_token)
    best_pre = max(ours, key=lambda r: r.prefill_tokens_per_s)
    t: dict[str, Any] = {"ours_best_decode": best_dec.setting, "ours_best_prefill": best_pre.setting}
    hf = [r for r in rep.speed if r.impl == "transformers"]
    if hf:
        hd = min(hf, key=lambda r: r.decode_ms_per_token)
        hp = max(hf, key=lambda r: r.prefill_tokens_per_s)
        t["decode_speedup_vs_transformers"] = hd.decode_ms_per_token / best_dec.decode_ms_per_token
        t["prefill_speedup_vs_transformers"] = best_pre.prefill_tokens_per_s / hp.prefill_tokens_per_s
    lc = [r for r in rep.speed if r.impl == "llama.cpp"]
    if lc:
        t["decode_ratio_vs_llamacpp"] = best_dec.decode_ms_per_token / lc[0].decode_ms_per_token
        t["prefill_speedup_vs_llamacpp"] = best_pre.prefill_tokens_per_s / lc[0].prefill_tokens_per_s
    if rep.prefix_cache:
        t["prefix_cache_ttft_speedup"] = rep.prefix_cache["speedup"]
    if rep.memory.get("requests"):
        t["kv_blocks_referenced_after"] = rep.memory["kv_blocks_referenced_after"]
    if rep.batching:
        t["batching_speedup"] = rep.batching["speedup"]
    t["goals"] = {"decode_speedup_vs_transformers": ">= 3", "decode_ratio_vs_llamacpp": "<= 1.0",
                  "prefill_speedup_vs_transformers": ">= 2", "prefill_speedup_vs_llamacpp": ">= 2",
                  "prefix_cache_ttft_speedup": ">= 5", "batching_speedup": ">= 3",
                  "kv_blocks_referenced_after": "== 0"}
    return t


def _print_report(rep: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]agentrt bench engine[/] — {rep.model}, {rep.threads} threads, torch {rep.torch_version}, "
              f"medians of {rep.sizes['repeats']}; floor = weight bytes / {rep.bandwidth_gbs:.0f} GB/s "
              f"(measured now: {rep.bandwidth_gbs_measured:.1f} GB/s)")
    t = Table(title="speed")
    for c in ("impl", "setting", "decode ms/token", "floor ms/token", f"prefill {rep.sizes['prefill']} tok (s)",
              "prefill tok/s", "weights MB"):
        t.add_column(c, justify="right" if c not in ("impl", "setting") else "left")
    for r in rep.speed:
        t.add_row(r.impl, r.setting, f"{r.decode_ms_per_token:.1f}", f"{r.floor_ms_per_token:.1f}",
                  f"{r.prefill_s:.2f}", f"{r.prefill_tokens_per_s:.0f}", f"{r.weight_bytes / 1e6:.0f}")
    con.print(t)
    for r in rep.speed:
        if r.setting == "default":
            con.print(f"default (what LocalLLM() builds): {r.path}")
    for r in rep.speed:
        if r.prefill_split_s:
            sp = r.prefill_split_s
            con.print(f"{r.setting} prefill in the C++ step: linears {sp['linears']:.2f} s, attention "
                      f"{sp['attention']:.2f} s, rest {sp['rest']:.2f} s (of {r.prefill_s:.2f} s)")
    for k, v in rep.skipped.items():
        con.print(f"[yellow]skipped {k}[/]: {v}")
    pc = rep.prefix_cache
    con.print(f"prefix cache ({pc['setting']}): TTFT of a {pc['prompt_tokens']}-token prompt, first "
              f"{pc['shared_prefix_tokens']} shared: uncached {pc['ttft_uncached_s'] * 1e3:.0f} ms, cached "
              f"{pc['ttft_cached_s'] * 1e3:.0f} ms ({pc['cached_tokens_reported']} tokens reused) -> "
              f"{pc['speedup']:.1f}x (target >= 5x)")
    b = rep.batching
    n = b["concurrency"]
    con.print(f"batching ({b['setting']}): decode {b['tokens_per_s_1']:.1f} tok/s with 1 request, "
              f"{b[f'tokens_per_s_{n}']:.1f} tok/s with {n} -> {b['speedup']:.1f}x (target >= 3x)")
    if rep.accuracy:
        t = Table(title="accuracy vs fp32")
        for c in ("setting", "max |logit diff|", "mean |logit diff|", "top-1 agree", "prefill top-1 agree",
                  "greedy agree", "identical prefix"):
            t.add_column(c, justify="right")
        for a in rep.accuracy:
            t.add_row(a["setting"], f"{a['max_abs_logit_diff']:.3f}", f"{a['mean_abs_logit_diff']:.4f}",
                      f"{a['top1_agreement']:.1%}", f"{a['prefill_top1_agreement']:.1%}",
                      f"{a['greedy_agreement']:.1%}",
                      f"{a['greedy_identical_prefix_mean']:.1f}/{a['greedy_tokens']}")
        con.print(t)
    m = rep.memory
    con.print(f"memory: RSS {m['rss_mb_now']:.0f} MB with our engines loaded, peak "
              f"{m['peak_rss_mb_total']:.0f} MB (whole run, baselines included); after {m['requests']} requests: "
              f"{m['kv_blocks_referenced_after']} KV blocks referenced (must be 0), "
              f"{m['kv_blocks_cached_after']} cached for reuse, of {m['kv_blocks_total']}")
    tg = {k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in rep.targets.items() if k != "goals"}
    con.print(f"targets: {tg}")


def main(args: argparse.Namespace) -> int:
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.scale:
        from agentrt.benchmarks import scale

        bw = measure_bandwidth_gbs(args.threads)
        models = [m.strip() for m in (args.model or "synthetic:1b").split(",") if m.strip()]
        rows = scale.run_scale(models, args.threads, args.repeats or 3, args.decode_tokens or 64, bw, log,
                               llamacpp=not args.no_llamacpp)
        report = scale.to_json(rows, bw)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(report, f, indent=2)
        print(json.dumps(report, indent=2)) if args.json else scale.print_rows(rows, bw)
        return 0
    rep = run(args, log)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(rep), f, indent=2)
    if args.json:
        print(json.dumps(asdict(rep), indent=2))
    else:
        _print_report(rep)
    return 0
