"""engine/decode_fused.py + decode_kernel.cpp: the fused C++ int8 decode step matches the torch path."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _engine_util import tiny_loaded  # noqa: E402

from agentrt.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from agentrt.engine import decode_fused  # noqa: E402
from agentrt.engine.quant import Int8WeightOnlyLinear  # noqa: E402


@pytest.fixture(scope="module")
def ext():
    e = decode_fused.load_extension()
    if e is None:  # the optional part: a C++ compiler / ninja / torch headers
        pytest.skip(f"the C++ decode extension cannot build here: {decode_fused.unavailable_reason()}")
    return e


# sizes that are not multiples of the kernel's blocks (4 rows, 16 columns): the tails run too
_ODD = dict(hidden_size=40, intermediate_size=52, num_attention_heads=4, num_key_value_heads=2, head_dim=10)


def _engines(fused_kw: dict | None = None, **over):
    loaded = tiny_loaded(**{**_ODD, **over})
    kw = dict(dtype="float32", quantization="int8", num_threads=2, block_size=4, num_kv_blocks=64)
    fused = LLMEngine(EngineConfig(fused_decode=True, **kw, **(fused_kw or {})), loaded=loaded)
    ref = LLMEngine(EngineConfig(**kw), loaded=loaded)
    for mod in list(ref.model.modules()):  # the reference: the same int8 weights, float32 activations
        if isinstance(mod, Int8WeightOnlyLinear):
            mod.compute_dtype, mod.scales = torch.float32, mod.scales.float()
    return fused, ref


@pytest.mark.parametrize("n,k", [(8, 16), (13, 40), (960, 576), (7, 1537)])
def test_int8_linear_matches_dequantized(ext, n, k):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    q = Int8WeightOnlyLinear(lin.weight, lin.bias)
    f = decode_fused.FusedInt8Linear(q, ext)
    x = torch.randn(5, k)
    ref = x @ q.dequantized_weight().T + q.bias.float()
    torch.testing.assert_close(f(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f(x[:1]), ref[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over", [{}, {"attention_bias": True, "model_type": "qwen2"}])
def test_fused_logits_match_torch_path(ext, over):
    """Teacher-forced logits, one decode step per token, equal the torch path's (same int8 weights)."""
    fused, ref = _engines(**over)
    assert fused._fused is not None
    ids = [int(t) for t in torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(3))]
    a = decode_fused.fused_prompt_logits(fused, ids)
    b = ref.prompt_logits(ids, chunk_size=1)
    assert a.shape == b.shape == (37, fused.vocab_size)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert fused.stats().kv_blocks_used == 0


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
        EngineConfig(fused_decode=True, quantization="int4", dtype="float32")
    with pytest.raises(ValueError, match="fused_decode"):
        EngineConfig(fused_decode=True, quantization="int8", dtype="bfloat16")


def test_falls_back_when_the_extension_cannot_build(monkeypatch, caplog):
    """Without the extension the engine warns once and decodes on the torch path."""
    monkeypatch.setenv("AGENTRT_NO_CPP_DECODE", "1")
    monkeypatch.delattr(decode_fused.load_extension, "_warned", raising=False)
    decode_fused._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="agentrt.engine.decode_fused"):
            eng = LLMEngine(EngineConfig(dtype="float32", quantization="int8", fused_decode=True, num_threads=2),
                            loaded=tiny_loaded(**_ODD))
        assert eng._fused is None
        assert "AGENTRT_NO_CPP_DECODE" in caplog.text
        assert len(eng.generate(["abc"], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_token_ids) == 4
    finally:
        decode_fused._load.cache_clear()  # later tests load the real extension again
