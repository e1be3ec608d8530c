"""Write a GGUF's weights again as Q4_K_M, the file most people download, to measure the engine on real
weights in K-quants (gguf-py reads K-quants but has no quantizer for them):

    python -m agentrt.benchmarks.kquants OUT.gguf [SOURCE.gguf]   # default source: the embedded model

Q4_K_M as llama.cpp lays it out: Q4_K for the decoder linears, Q6_K for attn_v and ffn_down in the
layers llama.cpp gives more bits (the first and last eighth, and every third in between) and for a
separate output matrix; where a row is not a whole number of 256-weight super-blocks, llama.cpp's
fallbacks (Q5_0 for Q4_K, Q8_0 for Q6_K: SmolLM2-135M's 576-wide linears; its 1,536-wide ffn_down is
K-quant). The token embedding, norms and metadata are copied unchanged. The quantizers are
the plain min/max ones (llama.cpp searches each block's scale for a lower error): every block is valid,
its error a little larger. Accuracy is then measured against the file's own dequantized weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 [N, K] (K % 256 == 0) -> Q4_K blocks [N, K / 256 * 144] uint8: w ~= d * sc * q - dmin * m."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)  # the min is kept <= 0: w = a * q - b with b >= 0
    a, b = (hi - lo) / 15, -lo  # [N, S, 8]
    d, dmin = (a.max(-1) / 63).astype(np.float16), (b.max(-1) / 63).astype(np.float16)  # [N, S]
    df, dmf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    sc = np.clip(np.round(np.divide(a, df, out=np.zeros_like(a), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(b, dmf, out=np.zeros_like(b), where=dmf > 0)), 0, 63).astype(np.uint8)
    step, off = df * sc, dmf * mn  # [N, S, 8]
    q = np.round(np.divide(x + off[..., None], step[..., None], out=np.zeros_like(x), where=step[..., None] > 0))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, k // 256, 4, 2, 32)  # [chunk of 64][low, high half]
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(n, k // 256, 128)
    scales = np.empty((n, k // 256, 12), dtype=np.uint8)  # the inverse of gguf.quants.Q4_K.get_scale_min
    scales[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    scales[..., 4:8] = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    head = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8)], -1)  # [N, S, 4]
    return np.concatenate([head, scales, qs], -1).reshape(n, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [N, K] (K % 256 == 0) -> Q6_K blocks [N, K / 256 * 210] uint8: w ~= d * sc * (q - 32)."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    a = np.abs(x).max(-1) / 31  # [N, S, 16]
    d = (a.max(-1) / 127).astype(np.float16)  # [N, S]
    df = d.astype(np.float32)[..., None]
    sc = np.clip(np.round(np.divide(a, df, out=np.zeros_like(a), where=df > 0)), -127, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.round(np.divide(x, step, out=np.zeros_like(x), where=step != 0)) + 32
    q = np.clip(q, 0, 63).astype(np.uint8).reshape(n, k // 256, 2, 4, 32)  # [half of 128][quarter][32]
    ql = ((q[:, :, :, 0:2] & 15) | ((q[:, :, :, 2:4] & 15) << 4)).reshape(n, k // 256, 128)
    qh = ((q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]).sum(3, dtype=np.uint8).reshape(n, k // 256, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d[..., None].view(np.uint8)], -1).reshape(n, -1)


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers Q4_K_M gives Q6_K for attn_v and ffn_down."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def write_q4_k_m(source: str | Path, out: str | Path) -> Path:
    """The GGUF at ``source`` written again as Q4_K_M at ``out`` (see the module docstring)."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    layers = int(reader.fields[f"{arch}.block_count"].contents())
    w = gguf.GGUFWriter(str(out), arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        linear = t.name.startswith("blk.") and len(t.shape) == 2
        wide = t.name == "output.weight" or (linear and parts[2] in ("attn_v", "ffn_down")
                                             and _more_bits(int(parts[1]), layers))
        if (linear or t.name == "output.weight") and data.shape[1] % 256 == 0:
            blocks = quantize_q6_k(data) if wide else quantize_q4_k(data)
            w.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q6_K if wide else
                         gguf.GGMLQuantizationType.Q4_K)
        elif linear or t.name == "output.weight":  # rows not in super-blocks of 256: llama.cpp's fallbacks
            qtype = gguf.GGMLQuantizationType.Q8_0 if wide else gguf.GGMLQuantizationType.Q5_0
            w.add_tensor(t.name, quantize(data, qtype), raw_dtype=qtype)
        elif t.tensor_type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, data)
        else:  # the embedding keeps its own blocks
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


if __name__ == "__main__":
    from agentrt.engine.loader import embedded_model_path

    print(write_q4_k_m(sys.argv[2] if len(sys.argv) > 2 else embedded_model_path(), sys.argv[1]))
