"""engine/decode_fused.py + decode_kernel.cpp: the fused C++ int8 decode step matches the torch path."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from agentrt.engine import EngineConfig, LLMEngine, SamplingParams, decode_fused
from agentrt.engine.model import DecodeQuantLinear
from agentrt.engine.quant import Int8WeightOnlyLinear
from tests.helpers.engine import tiny_loaded

# sizes that are not multiples of the kernel's blocks (4 rows, 16 columns): the tails run too
_ODD = dict(hidden_size=40, intermediate_size=52, num_attention_heads=4, num_key_value_heads=2, head_dim=10)


def _engines(**over):
    """(fused int8 engine, reference): the reference runs the torch path on the same int8 weights with
    float32 activations and the float32 bias."""
    loaded = tiny_loaded(**{**_ODD, **over})
    kw = dict(dtype="float32", quantization="int8", num_threads=2, block_size=4, num_kv_blocks=64)
    fused = LLMEngine(EngineConfig(fused_decode=True, **kw), loaded=loaded)
    ref = LLMEngine(EngineConfig(**kw), loaded=loaded)
    for mod in list(ref.model.modules()):
        if isinstance(mod, DecodeQuantLinear) and isinstance(mod.quantized, Int8WeightOnlyLinear):
            q = mod.quantized
            q.compute_dtype, q.scales, q.bias = torch.float32, q.scales.float(), mod.dense.bias
    ref.model.lm_head.compute_dtype = torch.float32
    ref.model.lm_head.scales = ref.model.lm_head.scales.float()
    return fused, ref


def _engines_int4(**over):
    """(fused int4 engine, reference): the reference is the float32 torch path on the weights rounded
    to the int4 grid, with the fused engine's lm_head."""
    cfg = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    loaded = tiny_loaded(**{**cfg, **over})
    kw = dict(dtype="float32", num_threads=2, block_size=4, num_kv_blocks=64)
    fused = LLMEngine(EngineConfig(fused_decode=True, quantization="int4", **kw), loaded=loaded)
    rounded = {k: (decode_fused.dequantize_int4_groups(*decode_fused.quantize_int4_groups(w))
                   if k.endswith("proj.weight") else w) for k, w in loaded.weights.items()}
    ref = LLMEngine(EngineConfig(**kw), loaded=type(loaded)(**{**vars(loaded), "weights": rounded}))
    ref.model.lm_head = fused.model.lm_head
    return fused, ref


def _assert_within_activation_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """y == x @ w.T + b up to the kernel's int8 rounding of the activations per block of 32 inputs (half
    a step of the block's max|x| / 127 per element, times |w|) and float32 summation (1e-5)."""
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    g = -(-x.shape[1] // 32)
    pad = (0, g * 32 - x.shape[1])
    step = torch.nn.functional.pad(x.abs(), pad).reshape(len(x), g, 32).amax(-1).double() / 127 / 2  # [M, G]
    wsum = torch.nn.functional.pad(w.abs(), pad).reshape(len(w), g, 32).sum(-1).double()  # [N, G]
    bound = step @ wsum.T + 1e-5  # [M, N]
    assert ((y.double() - ref).abs() <= bound).all(), (y - ref).abs().max()


@pytest.mark.parametrize("n,k", [(8, 16), (13, 40), (960, 576), (7, 1537)])
def test_int8_rows_linear(ext, n, k):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    q = Int8WeightOnlyLinear(lin.weight, lin.bias)
    f = decode_fused.FusedLinear([q.weight, q.scales.float(), torch.empty(0)], lin.bias.detach(), k, ext)
    x = torch.randn(5, k)
    for m in (5, 1):
        _assert_within_activation_rounding(f(x[:m]), x[:m], q.dequantized_weight(), lin.bias.detach())


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("n,k", [(8, 32), (13, 96), (960, 576)])
def test_group_linears(ext, kind, n, k):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    if kind == "int8":
        q, d = decode_fused.quantize_int8_groups(w)
        parts, wq = [q, d, torch.empty(0)], q.float() * d.float().repeat_interleave(32, 1)
    else:
        parts = list(decode_fused.quantize_int4_groups(w))
        wq = decode_fused.dequantize_int4_groups(*parts)
    assert (wq - w).abs().max() <= w.abs().max() / (127 if kind == "int8" else 15)
    f = decode_fused.FusedLinear(parts, torch.empty(0), k, ext)
    x = torch.randn(5, k)
    for m in (5, 1):
        _assert_within_activation_rounding(f(x[:m]), x[:m], wq, None)
    with pytest.raises(RuntimeError, match="K rounded up to 32|K/2"):  # inputs the weight does not have
        ext.linear(torch.randn(5, k + 32), *parts, torch.empty(0))


@pytest.mark.parametrize("build", [_engines, _engines_int4])
@pytest.mark.parametrize("over", [{}, {"attention_bias": True, "model_type": "qwen2"}])
def test_fused_logits_match_torch_path(ext, build, over):
    """Teacher-forced logits, one decode step per token, equal the torch path's on the same weights
    up to the kernel's int8 rounding of activations per block of 32 (~0.6% of a dot's size per linear,
    <0.9% measured on a logits row after two layers and the lm_head; bounded here by 2%)."""
    fused, ref = build(**over)
    assert fused.runner.fused is not None
    ids = [int(t) for t in torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(3))]
    a = fused.prompt_logits(ids, chunk_size=1)
    b = ref.prompt_logits(ids, chunk_size=1)
    assert a.shape == b.shape == (37, fused.vocab_size)
    assert ((a - b).norm(dim=-1) <= 0.02 * b.norm(dim=-1)).all(), ((a - b).norm(dim=-1) / b.norm(dim=-1)).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert fused.stats().kv_blocks_used == 0


def test_int4_groups_round_trip_the_q4_1_grid():
    """Weights already on a Q4_1 grid (as dequantized from the GGUF) come back exactly."""
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(8, 4, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(8, 4, generator=g) * 0.05).half().float()
    q = torch.randint(0, 16, (8, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full range, so the grid is recovered
    w = (q * d[..., None] + m[..., None]).reshape(8, 128)
    packed, dd, mm = decode_fused.quantize_int4_groups(w)
    assert packed.shape == (8, 64) and packed.dtype == torch.uint8
    torch.testing.assert_close(decode_fused.dequantize_int4_groups(packed, dd, mm), w, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        decode_fused.quantize_int4_groups(torch.zeros(4, 40))


def test_fused_batch_greedy_matches(ext):
    """Several sequences of different lengths decode together (padded slot table, scattered blocks)
    and produce the torch path's greedy tokens."""
    fused, ref = _engines()
    prompts = ["a", "hello world, hello", "the quick brown fox jumps over the lazy dog " * 2, "xyz" * 5]
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    out_f = [o.output_token_ids for o in fused.generate(prompts, sp)]
    out_r = [o.output_token_ids for o in ref.generate(prompts, sp)]
    assert out_f == out_r
    assert all(len(o) == 20 for o in out_f)


def test_fused_decode_config_errors():
    with pytest.raises(ValueError, match="fused_decode"):
        EngineConfig(fused_decode=True)  # no quantization
    with pytest.raises(ValueError, match="fused_decode"):
        EngineConfig(fused_decode=True, quantization="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="fused_activations='int16' needs fused_decode"):
        EngineConfig(quantization="int8", fused_activations="int16")  # would be silently ignored
    with pytest.raises(ValueError, match="choose 'int8' or 'int16'"):
        EngineConfig(quantization="int4", fused_decode=True, fused_activations="fp8")


def test_falls_back_when_the_extension_cannot_build(monkeypatch, caplog):
    """Without the extension the engine warns once and decodes on the torch path."""
    monkeypatch.setenv("AGENTRT_NO_CPP_DECODE", "1")
    monkeypatch.delattr(decode_fused.load_extension, "_warned", raising=False)
    decode_fused._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="agentrt.engine.decode_fused"):
            eng = LLMEngine(EngineConfig(dtype="float32", quantization="int8", fused_decode=True, num_threads=2),
                            loaded=tiny_loaded(**_ODD))
        assert eng.runner.fused is None
        assert "AGENTRT_NO_CPP_DECODE" in caplog.text
        assert len(eng.generate(["abc"], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_token_ids) == 4
    finally:
        decode_fused._load.cache_clear()  # later tests load the real extension again


_INT4_SHAPES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("quant_type,mode", [("Q4_1", "int4"), ("Q4_K", "int4"), ("Q4_0", "int4"),
                                             ("Q8_0", "int8"), ("Q6_K", "int8"), ("Q5_K", "int8")])
def test_the_default_runs_a_quantized_gguf_in_the_fused_step_on_its_bit_width(ext, quant_type, mode):
    """EngineConfig() (quantization="auto"): a GGUF's 4-bit types on the int4 grid, wider ones on int8, every
    step in the C++ step, whose packed weights are then the only copy of the layers."""
    loaded = tiny_loaded(**_INT4_SHAPES)
    loaded.quant_type = quant_type
    eng = LLMEngine(EngineConfig(num_threads=2, block_size=4, num_kv_blocks=64), loaded=loaded)
    assert (eng.config.quantization, eng.config.dtype, eng.config.fused_decode) == (mode, "float32", True)
    assert eng.runner.backends == [eng.runner.fused] and eng.runner.fused.prefill
    assert f"fused C++ step, {mode} weights" in eng.runner.describe()
    layer = eng.model.layers[0]
    assert all(not list(getattr(layer, n).parameters()) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    with pytest.raises(RuntimeError, match="fused C\\+\\+ step"):
        layer.qkv_proj(torch.zeros(1, 64))
    packed = sum(t.numel() * t.element_size() for t in eng.runner.fused.decoder.parts)
    assert packed < eng.decode_weight_bytes() < packed + 2 * eng.model.lm_head.weight.numel() + 4096
    # the same tokens as an explicitly fused engine on the same grid
    explicit = LLMEngine(EngineConfig(dtype="float32", quantization=mode, fused_decode=True, num_threads=2,
                                      block_size=4, num_kv_blocks=64), loaded=tiny_loaded(**_INT4_SHAPES))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert eng.generate("abcdef", params)[0].output_token_ids == explicit.generate("abcdef", params)[0].output_token_ids


@pytest.mark.parametrize("over,why", [
    ({"dtype": "float32"}, None),  # a pinned dtype asks for the dense torch path
    ({"quantization": None}, None),
    ({"device": "cpu", "compile": True}, None),
])
def test_the_default_keeps_a_pinned_dense_path(over, why):
    loaded = tiny_loaded(**_INT4_SHAPES)
    loaded.quant_type = "Q4_1"
    cfg, reason = EngineConfig(num_kv_blocks=64, **over).resolved(loaded.quant_type)
    assert cfg.quantization is None and not cfg.fused_decode and reason == why


def test_the_default_says_why_it_cannot_take_the_fused_step(monkeypatch, caplog):
    """A type without a fused grid, or no extension: the torch path, unquantized, with one warning naming why."""
    cfg, why = EngineConfig().resolved("IQ2_XXS")
    assert cfg.quantization is None and "IQ2_XXS" in why
    assert EngineConfig().resolved(None) == (EngineConfig(quantization=None), None)  # float weights: nothing to say
    monkeypatch.setenv("AGENTRT_NO_CPP_DECODE", "1")
    monkeypatch.delattr(decode_fused.load_extension, "_warned", raising=False)
    decode_fused._load.cache_clear()
    try:
        loaded = tiny_loaded(**_INT4_SHAPES)
        loaded.quant_type = "Q4_1"
        with caplog.at_level(logging.WARNING, logger="agentrt.engine.engine"):
            eng = LLMEngine(EngineConfig(num_kv_blocks=64), loaded=loaded)
        assert eng.runner.fused is None and eng.config.quantization is None
        assert "running the torch path" in caplog.text and "AGENTRT_NO_CPP_DECODE" in caplog.text
        assert len(eng.generate(["abc"], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_token_ids) == 4
    finally:
        decode_fused._load.cache_clear()


def test_the_embedded_gguf_reports_its_quant_type():
    from agentrt.engine.loader import embedded_model_path, gguf_quant_type

    assert gguf_quant_type(embedded_model_path()) == "Q4_1"
    from tests.helpers.engine import smollm_loaded

    assert smollm_loaded().quant_type == "Q4_1"  # recorded when the GGUF was converted


def test_a_lock_file_left_by_a_killed_process_does_not_hang_the_next_start(ext, tmp_path):
    # torch's loader waits on its build folder's lock file even to load a finished build; a process
    # killed while holding it (Ctrl-C at start-up) leaves it behind. A finished build loads without it.
    script = f"""
import os, shutil, sys
from pathlib import Path
from torch.utils import cpp_extension
from agentrt.engine import decode_fused
name = {ext.__name__!r}
target = Path(cpp_extension._get_build_directory(name, verbose=False))
shutil.copy({ext.__file__!r}, target / (name + ".so"))
(target / "lock").touch()
module = decode_fused.load_extension()
assert module is not None and Path(module.__file__).parent == target, (module, decode_fused.unavailable_reason())
print("loaded", module.isa())
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
