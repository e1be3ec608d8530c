"""Random-weight Llama GGUFs of real shapes, for speed and memory at the sizes users run (never for
accuracy): ``agentrt bench engine --model synthetic:1b`` (also ``3b``, ``8b``; ``synthetic:8b:q4_k_m``
for the Q4_K_M mix of Q4_K and Q6_K that most downloads are, ``q5_k_m`` for Q5_K and Q6_K, ``q4_1`` by
default). The shapes are
Llama 3.2 1B / 3B and Llama 3.1 8B with the embedded model's tokenizer (its 49,152-token vocabulary);
the file is written once into the model cache and reused.

The weights are random bytes in each quant type's block layout with small fixed scales, so they are
valid blocks whatever the bytes (no quantizer runs: gguf-py has none for the K-quants).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, tied=True),  # Llama 3.2 1B
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, tied=True),  # Llama 3.2 3B
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, tied=False),  # Llama 3.1 8B
}
MIXES = ("q4_1", "q4_k_m", "q5_k_m")
# (values per block, bytes per block, [(byte offset, fp16 value)] of the scale fields); the rest random
_BLOCKS = {
    "Q4_1": (32, 20, [(0, 2e-3), (2, -8 * 2e-3)]),  # d, m: w = d * q + m, q in 0..15
    "Q4_K": (256, 144, [(0, 1e-4), (2, 1e-4)]),  # d, dmin; 6-bit sub-scales and mins random
    "Q5_K": (256, 176, [(0, 5e-5), (2, 5e-5)]),  # as Q4_K, then 32 bytes of high bits
    "Q6_K": (256, 210, [(208, 1e-5)]),  # d at the end; int8 sub-scales random
}


def synthetic_model(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF for ``spec`` ("synthetic:<size>[:<mix>]"), written on first use."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "synthetic" or parts[1] not in SHAPES or \
            (len(parts) == 3 and parts[2] not in MIXES):
        raise ValueError(f"unknown synthetic model {spec!r}: use synthetic:<{'|'.join(SHAPES)}>[:<{'|'.join(MIXES)}>]")
    size, mix = parts[1], parts[2] if len(parts) == 3 else "q4_1"
    from agentrt.engine.loader import cache_root

    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    path = root / f"synthetic-llama-{size}-{mix}.gguf"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            _write(tmp, SHAPES[size], mix, f"synthetic-llama-{size}-{mix}")
            tmp.rename(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _write(path: Path, shape: dict[str, Any], mix: str, name: str) -> None:
    import gguf

    from agentrt.engine.loader import embedded_model_path

    tok = gguf.GGUFReader(str(embedded_model_path()))
    field = lambda key: tok.fields[key].contents()  # noqa: E731
    vocab = len(tok.fields["tokenizer.ggml.tokens"].data)
    h, heads, kv = shape["hidden"], shape["heads"], shape["kv_heads"]
    hd = h // heads
    w = gguf.GGUFWriter(str(path), "llama", use_temp_file=True)
    w.add_name(name)
    w.add_block_count(shape["layers"])
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_feed_forward_length(shape["intermediate"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(field("tokenizer.ggml.tokens"))
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    w.add_add_bos_token(False)
    w.add_chat_template(field("tokenizer.chat_template"))

    rng = np.random.default_rng(0)
    # the K-quant mixes keep attn_v and ffn_down in Q6_K (llama.cpp's Q4_K_M and Q5_K_M in most layers)
    main, wide = {"q4_1": ("Q4_1", "Q4_1"), "q4_k_m": ("Q4_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K")}[mix]
    _add(w, rng, "token_embd.weight", vocab, h, main)
    for i in range(shape["layers"]):
        p = f"blk.{i}."
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(p + n + ".weight", np.ones(h, dtype=np.float32))
        _add(w, rng, p + "attn_q.weight", heads * hd, h, main)
        _add(w, rng, p + "attn_k.weight", kv * hd, h, main)
        _add(w, rng, p + "attn_v.weight", kv * hd, h, wide)
        _add(w, rng, p + "attn_output.weight", h, heads * hd, main)
        _add(w, rng, p + "ffn_gate.weight", shape["intermediate"], h, main)
        _add(w, rng, p + "ffn_up.weight", shape["intermediate"], h, main)
        _add(w, rng, p + "ffn_down.weight", h, shape["intermediate"], wide)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    if not shape["tied"]:
        _add(w, rng, "output.weight", vocab, h, wide)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def _add(w: Any, rng: np.random.Generator, name: str, rows: int, cols: int, qtype: str) -> None:
    """A [rows, cols] weight of random ``qtype`` blocks."""
    import gguf

    per, nbytes, scales = _BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // per, nbytes), dtype=np.uint8)
    for offset, value in scales:
        blocks[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
