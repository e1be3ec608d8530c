"""The engine flags `agentrt run` and `agentrt serve` share, and the `EngineConfig` overrides they make."""
from __future__ import annotations

import argparse
from typing import Any


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", choices=["auto", "int8", "int4", "none"], default="auto",
                        help="int8 / int4: the decoder's linears on that grid in the fused C++ step (float32 "
                        "activations, CPU; a request's output then never depends on its batch); none: the "
                        "model's own dtype on the torch path; auto (default): a quantized GGUF in the fused step "
                        "on its own bit width, anything else as none")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads for the engine (default: chosen by measuring step times)")
    parser.add_argument("--kv-cache-gb", type=float, default=None, metavar="GB",
                        help="memory for the KV cache (default 1 GiB, at least one full context)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "float16", "float32"], default="auto",
                        help="what the KV cache stores in the fused C++ step (auto, the default: float16, half "
                        "the memory; the torch path keeps the model's dtype)")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help="context window (default: the model's, at most 8192)")


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` keyword overrides from the flags (only those given)."""
    out: dict[str, Any] = {}
    if args.quantization == "none":
        out["quantization"] = None
    elif args.quantization in ("int8", "int4"):
        out |= {"quantization": args.quantization, "dtype": "float32", "fused_decode": True}
    if args.threads is not None:
        out["num_threads"] = args.threads
    if args.kv_cache_gb is not None:
        out["kv_cache_gb"] = args.kv_cache_gb
    if args.kv_cache_dtype != "auto":
        out["kv_cache_dtype"] = args.kv_cache_dtype
    if args.max_model_len is not None:
        out["max_model_len"] = args.max_model_len
    return out
