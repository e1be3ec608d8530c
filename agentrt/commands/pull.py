"""`agentrt pull [SOURCE]`: check a model and cache what loading it needs, and say where it went.

A GGUF file (default: the embedded SmolLM2-135M-Instruct) has its header checked (architecture,
tensor shapes, quant types) and its config and tokenizer cached as a small HF folder, so later loads
skip that; the weights stay in the file, which the engine reads directly. An HF folder or
.safetensors file needs nothing cached; it is only checked.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help="a .gguf file, HF folder or .safetensors file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--cache-dir", default=None,
                        help="where converted models go (default $AGENTRT_CACHE or ~/.cache/agentrt/models)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    from agentrt.engine.loader import (ModelNotFoundError, UnsupportedModelError, cache_root, load_model,
                                       resolve_source)

    t0 = time.perf_counter()
    try:
        path = resolve_source(args.source)
        loaded = load_model(args.source, cache_dir=args.cache_dir, progress=not args.json)
    except (ModelNotFoundError, UnsupportedModelError) as e:
        print(f"agentrt pull: {e}", file=sys.stderr)
        return 1
    cfg = loaded.config
    info = {
        "name": loaded.name,
        "source": str(path),
        "converted_to": loaded.cache_dir,  # None: the source is already an HF folder / safetensors file
        "cache_root": str(args.cache_dir or cache_root()),
        "model_type": cfg["model_type"],
        "parameters": loaded.num_parameters,
        "layers": cfg["num_hidden_layers"],
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        where = info["converted_to"] or f"{path} (used in place, no conversion needed)"
        print(f"{info['name']}: {info['parameters'] / 1e6:.0f}M parameters, {info['layers']} layers, "
              f"{cfg['model_type']} -> {where} ({info['seconds']} s)")
    return 0
