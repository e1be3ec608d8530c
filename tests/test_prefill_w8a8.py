"""Dynamic int8 (W8A8) prefill: asymmetric per-token activation ranges, float32 outlier channels
(engine/dynamic_int8.py), and its accuracy in the engine vs float32 on real tool-calling prompts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from agentrt.engine.dynamic_int8 import DynamicInt8Linear, dynamic_int8_available

pytestmark = pytest.mark.skipif(not dynamic_int8_available(), reason="torch has no FBGEMM quantized engine (non-x86)")

_BFCL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bfcl" / "simple.jsonl"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _fake_quant_sym(x: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """What symmetric per-row 7-bit activations would give: round(x / s) * s, s = 2 max|x| / levels."""
    s = x.abs().amax(1, keepdim=True) * 2 / levels
    return torch.round(x / s) * s


def test_asymmetric_rows_beat_symmetric_on_shifted_activations():
    """Rows far from zero-centred (post-SiLU activations are mostly >= -0.28) use the whole 7-bit code
    range: the error is well below symmetric per-row rounding of the same rows."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=False)
    x = torch.rand(64, 512) * 3.0 + 1.0  # all in [1, 4]
    q = DynamicInt8Linear(lin.weight)
    ref = x @ q.dequantized_weight().T  # the same int8 weights, exact activations
    ours = _rel(q(x), ref)
    sym = _rel(_fake_quant_sym(x) @ q.dequantized_weight().T, ref)
    assert 0 < ours < 0.5 * sym, (ours, sym)


def test_outlier_channels_run_in_float32():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=True)
    scale = torch.ones(256)
    scale[[5, 90, 200]] = 80.0  # three outlier channels
    x = torch.randn(96, 256) * scale
    absmax = x.abs().amax(0)
    with torch.no_grad():
        ref = lin(x)
    split = DynamicInt8Linear(lin.weight, lin.bias, act_absmax=absmax, outliers=3)
    assert split.outlier_idx.tolist() == [5, 90, 200]
    # the outlier columns of the effective weight are the float32 ones, exactly
    assert torch.equal(split.dequantized_weight()[:, [5, 90, 200]], lin.weight.detach()[:, [5, 90, 200]])
    smooth_only = DynamicInt8Linear(lin.weight, lin.bias, act_absmax=absmax, outliers=0)
    assert _rel(split(x), ref) < 0.5 * _rel(smooth_only(x), ref)
    assert "outliers=3" in repr(split)


def test_outlier_arguments_are_checked():
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="needs act_absmax"):
        DynamicInt8Linear(w, outliers=4)
    with pytest.raises(ValueError, match=r"outliers=64 must be in \[0, 64\)"):
        DynamicInt8Linear(w, act_absmax=torch.ones(64), outliers=64)
    assert DynamicInt8Linear(w).outlier_idx is None  # uncalibrated: no outlier split by default
    assert DynamicInt8Linear(w, act_absmax=torch.rand(64)).outlier_idx.numel() > 0  # calibrated: default split


# ---- the engine on SmolLM2-135M: W8A8 prefill vs float32 ----------------------------------------


@pytest.fixture(scope="module")
def engines():
    from agentrt.engine import EngineConfig, LLMEngine
    from tests.helpers.engine import smollm_loaded

    if not _BFCL.exists():
        pytest.skip(f"shared BFCL data absent at {_BFCL}")
    loaded = smollm_loaded()
    kw = dict(dtype="float32", num_kv_blocks=160, max_model_len=1024, enable_prefix_caching=False)
    return (LLMEngine(EngineConfig(**kw), loaded=loaded),
            LLMEngine(EngineConfig(quantization="int8", prefill_int8=True, **kw), loaded=loaded))


def _bfcl_prompts(tok, n: int) -> list[str]:
    """The first ``n`` BFCL questions, each after a system turn listing its tools as JSON (as agents prompt)."""
    rows = [json.loads(line) for line in _BFCL.read_text().splitlines()[:n]]
    return [tok.apply_chat_template([{"role": "system", "content": "Tools: " + json.dumps(r["tools_openai"])},
                                     *r["question"][0]], add_generation_prompt=True, tokenize=False) for r in rows]


@pytest.mark.e2e
def test_w8a8_prefill_accuracy_on_tool_prompts(engines):
    """Teacher-forced over BFCL prompts (rendered with their tools, one 512-token prefill chunk each),
    then along float32's own greedy continuation one decode step a token, so the decode reads the KV
    the W8A8 prefill wrote. Both are top-1 agreement with float32 on the same context: comparing free
    greedy runs instead would count every token after the first near-tie flip (a pure bfloat16 forward
    gets ~0.98 top-1 on such text) as a miss, which says more about the CPU's rounding than about W8A8."""
    from agentrt.engine import SamplingParams

    ref, w8 = engines
    prompts = _bfcl_prompts(ref.tokenizer, 6)
    agree, total, worst = 0, 0, 0.0
    for p in prompts:
        ids = ref.tokenizer(p).input_ids
        a, b = ref.prompt_logits(ids, chunk_size=512), w8.prompt_logits(ids, chunk_size=512)
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += len(ids)
        worst = max(worst, (a - b).abs().max().item())
    sp = SamplingParams(max_tokens=32, ignore_eos=True)
    decode_agree, decode_total, first = 0, 0, 0
    for p, out in zip(prompts, ref.generate(prompts, sp)):
        ids, cont = ref.tokenizer(p).input_ids, list(out.output_token_ids)
        b = w8.prompt_logits(ids + cont[:-1], chunk_size=[len(ids), 1])[len(ids) - 1:]  # [32, V]
        picks = b.argmax(-1).tolist()
        first += picks[0] == cont[0]
        decode_agree += sum(i == j for i, j in zip(picks, cont))
        decode_total += len(cont)
    print(f"w8a8 prefill: top-1 {agree / total:.3f} over {total} tokens, max |logit diff| {worst:.2f}, "
          f"first token {first}/{len(prompts)}, decode after it {decode_agree / decode_total:.3f} top-1")
    assert agree / total >= 0.93 and worst < 8.0, (agree / total, worst)
    assert first >= len(prompts) - 1 and decode_agree / decode_total >= 0.93, (first, decode_agree / decode_total)
