"""The engine on the embedded SmolLM2-135M-Instruct: logits and greedy text vs transformers."""
from __future__ import annotations

import pytest
import torch

from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.engine import smollm_hf, smollm_loaded

pytestmark = pytest.mark.e2e

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is 2+2? Answer briefly.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf():
    return smollm_hf()


@pytest.fixture(scope="module")
def engine_fp32():
    return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64),
                     loaded=smollm_loaded())


def test_logits_match_transformers_fp32(hf, engine_fp32):
    model, tok = hf
    for text in TEXTS:
        ids = tok(text).input_ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float()  # [T, V]
        ours = engine_fp32.prompt_logits(ids)
        diff = (ours - ref).abs().max().item()
        # fp32 both sides; logits are O(10): allow summation-order noise only
        assert diff < 2e-3, f"max abs logit diff {diff} on {text!r}"


def test_greedy_matches_transformers_generate(hf, engine_fp32):
    model, tok = hf
    ids = tok(TEXTS[2]).input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    out = engine_fp32.generate([ids], SamplingParams(max_tokens=24))[0]
    eos = set(engine_fp32.eos_token_ids)
    ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
    assert out.output_token_ids == ref
    assert out.text.strip() != ""


def test_cached_and_uncached_greedy_identical(engine_fp32):
    tok = engine_fp32.tokenizer
    system = "<|im_start|>system\nYou are a helpful assistant that answers in one sentence.<|im_end|>\n"
    p1 = system + "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    p2 = system + "<|im_start|>user\nName an animal.<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(max_tokens=16)
    engine_fp32.generate(p1, params)
    hit = engine_fp32.generate(p2, params)[0]
    assert hit.metrics.cached_tokens >= 16
    cold = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64, enable_prefix_caching=False),
                     loaded=smollm_loaded()).generate(p2, params)[0]
    assert cold.metrics.cached_tokens == 0
    assert hit.output_token_ids == cold.output_token_ids
    assert tok is not None


def test_bf16_close_to_fp32(engine_fp32):
    eng = LLMEngine(EngineConfig(dtype="bfloat16", num_kv_blocks=64), loaded=smollm_loaded())
    ids = engine_fp32.tokenizer(TEXTS[1]).input_ids
    a, b = engine_fp32.prompt_logits(ids), eng.prompt_logits(ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"bf16 top-1 agreement with fp32 only {agree:.2f}"


@pytest.mark.parametrize("mode,min_agree", [("int8", 0.85), ("int4", 0.6)])
def test_weight_only_quantization_accuracy(engine_fp32, mode, min_agree):
    """The accuracy cost of weight-only quantization: top-1 agreement with fp32 over a prompt."""
    # chunks of 8 rows: the quantized (decode) kernels run, not the dense prefill copies
    eng = LLMEngine(EngineConfig(dtype="float32", quantization=mode, num_kv_blocks=64, max_num_batched_tokens=8),
                    loaded=smollm_loaded())
    ids = engine_fp32.tokenizer(TEXTS[1] + TEXTS[0] + TEXTS[2]).input_ids
    a, b = engine_fp32.prompt_logits(ids), eng.prompt_logits(ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff = (a - b).abs().max().item()
    print(f"{mode}: top-1 agreement {agree:.3f}, max abs logit diff {diff:.2f}")
    assert agree >= min_agree, f"{mode} top-1 agreement with fp32 only {agree:.2f} (max logit diff {diff:.2f})"


def test_incremental_detokenization_equals_full_decode_on_the_real_tokenizer(engine_fp32):
    """Token by token, the engine's incremental text is always a clean prefix of one full decode and ends
    equal to it (byte-level BPE: accents, CJK and emoji are split over several tokens)."""
    from agentrt.engine.detokenize import IncrementalDetokenizer

    tok = engine_fp32.tokenizer
    ids = tok("Naïve café — 日本語のテキスト 🙂🚀 done.\n<|im_end|> x").input_ids
    d = IncrementalDetokenizer(tok)
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n], skip_special_tokens=False)
        text = d.update(ids[:n])
        assert full.startswith(text) and "\ufffd" not in text
    assert d.flush(ids) == tok.decode(ids, skip_special_tokens=False)
