"""Each kernel build this CPU can run (AVX-512 VNNI, AVX2, scalar), forced with AGENTRT_KERNEL_ISA in a
fresh process: the SIMD builds give bit-identical outputs (the same integer sums, the same float order),
the scalar build the same up to float summation order; every build is within the activation rounding of
the float result."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from agentrt.engine.decode_fused import available_isas

_CHILD = textwrap.dedent("""
    import sys, torch
    from agentrt.engine import EngineConfig, LLMEngine
    from agentrt.engine.decode_fused import (FusedLinear, kernel_isa, load_extension, quantize_int4_groups,
                                             quantize_int8_groups)
    from agentrt.engine.gguf_grids import Grid
    from tests.helpers.engine import tiny_loaded
    ext = load_extension()
    assert ext is not None and ext.isa() == kernel_isa() == sys.argv[2], (ext and ext.isa(), kernel_isa())
    g = torch.Generator().manual_seed(0)
    out = {}
    for kind in ("int4", "int8"):
        w = torch.randn(200, 320, generator=g)
        parts = list(quantize_int4_groups(w)) if kind == "int4" else [*quantize_int8_groups(w), torch.empty(0)]
        bias = torch.randn(200, generator=g)
        for m in (1, 3, 37):
            x = torch.randn(m, 320, generator=g)
            for int16 in (False, True):
                out[f"{kind} rows={m} int16={int16}"] = (FusedLinear(parts, bias, 320, ext, int16)(x), x, w, bias)
    # Q4_K's super-block scales (K 512: two super-blocks; 21 rows: a short last block)
    q4k = Grid([torch.randint(0, 256, (21, 256), dtype=torch.uint8, generator=g),
                *(torch.randint(0, 64, (21, 16), dtype=torch.uint8, generator=g) for _ in range(2)),
                *((torch.rand(21, 2, generator=g) * 0.02).half() for _ in range(2))])
    for m in (1, 3, 37):
        x = torch.randn(m, 512, generator=g)
        out[f"int4 super-blocks rows={m}"] = (FusedLinear(q4k.parts, torch.empty(0), 512, ext)(x), x,
                                              q4k.dequantize(), torch.zeros(21))
    # Q6_K as int6 (the same shapes; 37 rows take the unpacked path)
    q6k = Grid([torch.randint(0, 64, (21, 512), dtype=torch.uint8, generator=g),
                torch.randint(-128, 128, (21, 32), generator=g).to(torch.int8),
                (torch.rand(21, 2, generator=g) * 0.002).half()])
    for m in (1, 3, 37):
        x = torch.randn(m, 512, generator=g)
        out[f"int6 rows={m}"] = (FusedLinear(q6k.parts, torch.empty(0), 512, ext)(x), x, q6k.dequantize(),
                                 torch.zeros(21))
    # Q5_K as int5: q 0..31 stored as int6's, Q4_K's super-block scales
    q5k = Grid([torch.randint(0, 32, (21, 512), dtype=torch.uint8, generator=g),
                *(torch.randint(0, 64, (21, 16), dtype=torch.uint8, generator=g) for _ in range(2)),
                *((torch.rand(21, 2, generator=g) * 0.02).half() for _ in range(2))])
    assert q5k.kind == "int5"
    for m in (1, 3, 37):
        x = torch.randn(m, 512, generator=g)
        out[f"int5 rows={m}"] = (FusedLinear(q5k.parts, torch.empty(0), 512, ext)(x), x, q5k.dequantize(),
                                 torch.zeros(21))
    loaded = tiny_loaded(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
    engines = {kv: LLMEngine(EngineConfig(dtype="float32", quantization="int4", fused_decode=True, num_threads=2,
                                          block_size=4, num_kv_blocks=64, kv_cache_dtype=kv), loaded=loaded)
               for kv in ("float32", "float16")}
    # across builds on a float32 cache: a float16 one rounds K and V, and a last-bit difference in the
    # scalar build's sums can round a value to the next float16 step
    out["step"] = engines["float32"].prompt_logits(list(range(3, 40)), chunk_size=[16, 1])
    eng = engines["float16"]  # what the C++ step runs by default
    ids = list(range(3, 140))  # three 64-key blocks
    out["chunking"] = (eng.prompt_logits(ids, chunk_size=len(ids)), eng.prompt_logits(ids, chunk_size=[64, 1, 1, 71]))
    # attention on float16 caches: each value widened, then float32's arithmetic (prefill, decode, tails)
    kc, vc = torch.randn(300, 2, 13, generator=g).half(), torch.randn(300, 2, 13, generator=g).half()
    q = torch.randn(24, 8 * 13, generator=g)
    args = (torch.tensor([0, 20, 21, 24]), torch.tensor([40, 280, 3]), torch.randperm(300, generator=g)[:280].expand(3, 280),
            8, 2, 13)
    out["float16 cache"] = (ext.attention(q, kc, vc, *args), ext.attention(q, kc.float(), vc.float(), *args))
    torch.save(out, sys.argv[1])
""")


_NOT_LINEARS = ("step", "chunking", "float16 cache")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ext):
    """{isa: that build's outputs}, each from a fresh process (the first use builds it: ~1 min)."""
    d = tmp_path_factory.mktemp("isa")
    res = {}
    for isa in available_isas():
        env = {**os.environ, "AGENTRT_KERNEL_ISA": isa, "PYTHONPATH": os.getcwd()}
        p = subprocess.run([sys.executable, "-c", _CHILD, str(d / f"{isa}.pt"), isa], env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, f"{isa}: {p.stderr[-3000:]}"
        res[isa] = torch.load(d / f"{isa}.pt", weights_only=False)
    return res


def test_every_build_is_within_activation_rounding_of_the_float_result(outputs):
    for isa, out in outputs.items():
        for name, (y, x, w, b) in ((k, v) for k, v in out.items() if k not in _NOT_LINEARS):
            ref = x.double() @ w.double().T + b.double()
            # int8 activations per block of 32: half a step (max|x| / 127) per element times |w|, on the
            # weights' own grid (int4 or int8 rounding of w adds its own error: compare to the grid result)
            g = x.shape[1] // 32
            step = x.abs().reshape(len(x), g, 32).amax(-1).double() / 127 / 2
            bound = step @ w.abs().reshape(len(w), g, 32).sum(-1).double().T
            grid_err = (x.double().abs() @ (w.double() - _grid(w, name)).abs().T)
            assert ((y.double() - ref).abs() <= bound + grid_err + 1e-4).all(), (isa, name)


def _grid(w: torch.Tensor, name: str) -> torch.Tensor:
    from agentrt.engine.decode_fused import dequantize_int4_groups, quantize_int4_groups, quantize_int8_groups

    if name.startswith("int4"):
        return dequantize_int4_groups(*quantize_int4_groups(w)).double()
    q, d = quantize_int8_groups(w)
    return (q.double().reshape(len(w), -1, 32) * d.double()[..., None]).reshape(w.shape)


def test_simd_builds_agree_bit_for_bit_and_scalar_to_summation_order(outputs):
    simd = [isa for isa in outputs if isa != "scalar"]
    if len(outputs) < 2:
        pytest.skip(f"this CPU runs one kernel build only ({', '.join(outputs)})")
    base = outputs[simd[0]] if simd else outputs["scalar"]
    for isa, out in outputs.items():
        for name, value in ((k, v) for k, v in out.items() if k not in ("chunking", "float16 cache")):
            y, y0 = (value, base[name]) if name == "step" else (value[0], base[name][0])
            if isa in simd:
                assert torch.equal(y, y0), (isa, name, (y - y0).abs().max())
            else:
                assert (y - y0).abs().max() <= 1e-5 * y0.abs().max() + 1e-4, (isa, name, (y - y0).abs().max())


def test_every_build_reads_a_float16_cache_as_its_float32_values(outputs):
    for isa, out in outputs.items():
        half, widened = out["float16 cache"]
        assert torch.equal(half, widened), (isa, (half - widened).abs().max())


def test_every_build_computes_a_row_alike_in_a_chunk_or_alone(outputs):
    """Prompt logits whole vs cut with rows computed alone (what a prefix-cache hit leaves): bit-identical in
    every build, the attention's one-row path doing the tiled path's arithmetic."""
    for isa, out in outputs.items():
        whole, cut = out["chunking"]
        assert torch.equal(whole, cut), (isa, (whole - cut).abs().max())
