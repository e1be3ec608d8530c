"""The fused C++ engine step (decode_kernel.cpp's ``ext.step``) on prefill chunks and mixed batches.

The reference is the torch forward (`LlamaModel.forward`: torch RMSNorm, RoPE, SDPA, SiLU) of an engine
with the same weights whose quantized linears are the fused engine's own C++ linears (`FusedLinear` over
the same parts) for every row count: what is compared is the
step around the linears (norms, RoPE, cache writes, attention, SwiGLU, row bookkeeping), whatever the
linear kernels' numerics are. Tolerance: float32 summation order and the kernels' activation rounding
(a last-bit difference can move an activation to the next integer step), ~1e-4 relative on the logits.
"""
from __future__ import annotations

import pytest
import torch

from agentrt.engine import EngineConfig, LLMEngine, SamplingParams, decode_fused
from agentrt.engine.model import DecodeQuantLinear
from tests.helpers.engine import tiny_loaded

_INT4 = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# sizes off the vector widths (8 floats) and the kernels' blocks: every tail runs (int8 rows: any K)
_ODD = dict(hidden_size=44, intermediate_size=52, num_attention_heads=4, num_key_value_heads=2, head_dim=10)


def _engines(mode: str = "int4", caching: bool = False, **over):
    """(fused engine, torch-path reference with the fused engine's linears and lm_head)."""
    loaded = tiny_loaded(**{**(_INT4 if mode == "int4" else _ODD), **over})
    kw = dict(dtype="float32", quantization=mode, num_threads=2, block_size=4, num_kv_blocks=96,
              enable_prefix_caching=caching, max_num_batched_tokens=64)
    # a float32 cache, as the torch path keeps (test_float16_cache_* cover float16's rounding)
    fused = LLMEngine(EngineConfig(fused_decode=True, kv_cache_dtype="float32", **kw), loaded=loaded)
    ref = LLMEngine(EngineConfig(**kw), loaded=loaded)
    assert fused.runner.fused is not None and fused.runner.fused.prefill
    for layer in ref.model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            mod = getattr(layer, name)
            assert isinstance(mod, DecodeQuantLinear)
            # the grid the fused engine's linears use (see decode_fused._lin_parts), in FusedLinear's input form
            if mode == "int4":
                parts = list(decode_fused.quantize_int4_groups(mod.dense.weight))
            else:
                q = mod.quantized
                parts = [q.weight, q.scales.float(), torch.empty(0)]
            bias = torch.empty(0) if mod.dense.bias is None else mod.dense.bias.detach()
            mod.quantized = decode_fused.FusedLinear(parts, bias, mod.dense.in_features, fused.runner.fused.decoder.ext)
            mod.max_rows = (1 << 30) - 1  # every row count on the quantized kernels, like the C++ step
    ref.model.lm_head = fused.model.lm_head
    return fused, ref


def _ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))]


def _run_steps(eng: LLMEngine, token_lists: list[list[int]], plan: list[list[tuple[int, int]]], fused: bool):
    """Run the step ``plan`` (per step: (sequence index, rows)) over sequences of ``token_lists`` on
    ``eng``, through the C++ step or the torch forward; returns each step's logits of all rows."""
    seqs = [eng.make_sequence(t, SamplingParams(max_tokens=1)) for t in token_lists]
    for s in seqs:
        eng.block_manager.grow(s, len(s.token_ids))
    out = []
    try:
        for entries in plan:
            e = [(seqs[i], n) for i, n in entries]
            backend = eng.runner.fused if fused else eng.runner.eager
            hidden = backend.run(eng.runner.prepare(e), all_rows=True)
            out.append(eng.model.compute_logits(hidden))
            for s, n in e:
                s.num_computed_tokens += n
    finally:
        for s in seqs:
            eng.block_manager.free(s)
    return out


def _assert_logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)
    top2 = b.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # rows whose top token is not a near tie
    assert (a.argmax(-1) == b.argmax(-1))[clear].all()


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_prefill_chunk_matches_torch_path(ext, mode):
    """One whole-prompt chunk, then the same prompt in chunks of 13 (the later ones start mid-sequence:
    keys from earlier steps in the cache) and one row a step; each against the torch forward."""
    fused, ref = _engines(mode)
    ids = _ids(41, 1)
    for chunk in (41, 13, 1):
        a, b = fused.prompt_logits(ids, chunk_size=chunk), ref.prompt_logits(ids, chunk_size=chunk)
        assert a.shape == (41, fused.vocab_size)
        _assert_logits_close(a, b)
    assert fused.stats().kv_blocks_used == 0


def test_mixed_batch_matches_torch_path(ext):
    """Steps mixing one-row entries (decode rows) with chunks of other sequences, a chunk starting
    mid-sequence and a sequence whose blocks are not consecutive in the pool."""
    fused, ref = _engines("int4")
    toks = [_ids(30, 2), _ids(23, 3), _ids(9, 4), _ids(17, 5)]
    plan = [[(0, 12), (1, 7)],                  # two chunks
            [(1, 1), (2, 9), (0, 18)],          # a one-row entry, a whole prompt, a chunk mid-sequence
            [(1, 1), (3, 5)],
            [(1, 1), (3, 12)],
            [(1, 13)]]
    a, b = _run_steps(fused, toks, plan, True), _run_steps(ref, toks, plan, False)
    for x, y in zip(a, b):
        _assert_logits_close(x, y)
    assert fused.stats().kv_blocks_used == 0


def test_row_order_does_not_matter(ext):
    """The C++ step takes decode rows and chunks in any order (the torch forward wants one-row entries
    first): the same entries reordered give the same logits per sequence."""
    fused, _ = _engines("int4")
    toks = [_ids(20, 6), _ids(11, 7), _ids(15, 8)]
    first = [[(0, 19), (1, 10), (2, 14)]]
    a = _run_steps(fused, toks, first + [[(0, 1), (1, 1), (2, 1)]], True)[1]
    b = _run_steps(fused, toks, first + [[(2, 1), (0, 1), (1, 1)]], True)[1]
    torch.testing.assert_close(a, b[[1, 2, 0]], rtol=0, atol=0)


def test_odd_sizes_greedy_matches(ext):
    """Tails of every loop (H 44, I 52, head_dim 10, int8 rows of any width): greedy tokens of several
    prompts batched with chunked prefill (chunks of 64 rows, mixed with decode rows) equal the torch
    path's."""
    fused, ref = _engines("int8")
    prompts = ["a", "hello world, hello " * 3, "the quick brown fox jumps over the lazy dog " * 3, "xyz" * 5]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    out_f = [o.output_token_ids for o in fused.generate(prompts, sp)]
    out_r = [o.output_token_ids for o in ref.generate(prompts, sp)]
    assert out_f == out_r and all(len(o) == 12 for o in out_f)


def test_prefix_cache_hit_matches_uncached(ext):
    """A prompt whose first blocks are in the prefix cache starts its prefill mid-sequence; its greedy
    tokens equal those of an engine without the cache. Each row's numerics do not depend on which
    other rows share its step, as long as the linears round activations the same way: they may keep
    finer activations for steps of few rows, so every chunk compared here has > 32 rows."""
    cached, _ = _engines("int4", caching=True)
    plain, _ = _engines("int4", caching=False)
    base = "the quick brown fox jumps over the lazy dog; " * 2
    tail = "and then a second question, long enough for a chunk of many rows"
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    cached.generate([base + "first"], sp)
    queried = cached.stats().prefix_cache_hit_tokens
    out_c = cached.generate([base + tail], sp)[0]
    assert 0 < out_c.metrics.cached_tokens <= len(base) and cached.stats().prefix_cache_hit_tokens > queried
    out_p = plain.generate([base + tail], sp)[0]
    assert out_c.output_token_ids == out_p.output_token_ids
    # the logits of the whole prompt in one chunk and in four chunks (each of > 32 rows)
    full = list((base + tail).encode())
    assert len(full) > 4 * 33
    torch.testing.assert_close(cached.prompt_logits(full, chunk_size=len(full)),
                               plain.prompt_logits(full, chunk_size=-(-len(full) // 4)), rtol=1e-4, atol=1e-4)


def test_step_checks_its_inputs(ext):
    fused, _ = _engines("int4")
    f, k, v = fused.runner.fused.decoder, fused.kv.k, fused.kv.v
    ids = torch.tensor([1, 2, 3])
    tables = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="seq_start"):
        f(ids, torch.tensor([0, 2]), torch.tensor([3]), tables, 4, None, k, v)  # rows do not add up to T
    with pytest.raises(RuntimeError, match="ctx_len"):
        f(ids, torch.tensor([0, 3]), torch.tensor([2]), tables, 4, None, k, v)  # fewer keys than rows
    with pytest.raises(RuntimeError, match="ctx_len"):
        f(ids, torch.tensor([0, 3]), torch.tensor([9]), tables, 4, None, k, v)  # more tokens than its blocks
    with pytest.raises(RuntimeError, match="outside the cache"):
        f(ids, torch.tensor([0, 3]), torch.tensor([3]), torch.tensor([[10 ** 6]]), 4, None, k, v)
    with pytest.raises(RuntimeError, match="out_rows"):
        f(ids, torch.tensor([0, 3]), torch.tensor([3]), tables, 4, torch.tensor([3]), k, v)


@pytest.mark.parametrize("acts", ["int8", "int16"])
def test_a_row_does_not_depend_on_its_batch(ext, acts):
    """A sequence's decode rows come out bit-identical alone, beside 9 other decode rows, and in steps
    with another sequence's prefill chunk (> 16 rows in all): the linears' activation precision and the
    attention's split of a long context (>= 512 keys) never depend on what shares the step."""
    loaded = tiny_loaded(**_INT4, max_position_embeddings=1024)
    eng = LLMEngine(EngineConfig(dtype="float32", quantization="int4", fused_decode=True, fused_activations=acts,
                                 num_threads=2, block_size=4, num_kv_blocks=700, enable_prefix_caching=False),
                    loaded=loaded)
    # tokens computed before the watched steps; sequence 0 is watched, 1 has the longest context, 2 a
    # prompt whose last 40 tokens come as chunks beside the watched rows
    done = (600, 700, 20, 5, 6, 7, 8, 9, 10, 11)
    toks = [_ids(n + (40 if i == 2 else 3), 10 + i) for i, n in enumerate(done)]
    first = [[(i, n) for i, n in enumerate(done)]]
    alone = _run_steps(eng, toks, first + [[(0, 1)]] * 3, fused=True)
    decodes = [(i, 1) for i in range(1, len(done)) if i != 2]
    beside = _run_steps(eng, toks, first + [decodes[:4] + [(0, 1)] + decodes[4:]] * 3, fused=True)
    chunked = _run_steps(eng, toks, first + [[(2, 17), (0, 1)], [(0, 1), (2, 20), (1, 1)], [(1, 1), (2, 3), (0, 1)]],
                         fused=True)
    for k, (at_beside, at_chunked) in enumerate([(4, 17), (4, 0), (4, 4)], start=1):
        row = alone[k][0]
        assert torch.equal(beside[k][at_beside], row), k
        assert torch.equal(chunked[k][at_chunked], row), k


@pytest.mark.e2e
def test_smollm_int4_fused_prompt_logits_vs_fp32(ext):
    """The embedded SmolLM2 (a Q4_1 GGUF: int4-fused holds its exact weights): teacher-forced logits
    through the C++ step vs the fp32 engine's. With int8 activations (per block of 32, every row count)
    measured 97% top-1 agreement on this text in chunks and 96.9% one row a step (on the first 48
    tokens, the hardest: short context, 85-100% depending on the rounding); with int16 activations one
    row a step agrees 100%, logits within 0.01."""
    from agentrt.benchmarks.prompts import text_token_ids
    from tests.helpers.engine import smollm_loaded

    loaded = smollm_loaded()
    kw = dict(dtype="float32", num_threads=2, enable_prefix_caching=False, max_model_len=512, num_kv_blocks=64)
    fp32 = LLMEngine(EngineConfig(**kw), loaded=loaded)
    ids = text_token_ids(fp32.tokenizer, 256, 1, fp32.vocab_size)
    ref = fp32.prompt_logits(ids, chunk_size=256)
    for acts in ("int8", "int16"):
        fused = LLMEngine(EngineConfig(quantization="int4", fused_decode=True, fused_activations=acts, **kw),
                          loaded=loaded)
        assert fused.runner.fused is not None and fused.runner.fused.prefill
        chunks = fused.prompt_logits(ids, chunk_size=128)  # two chunks: the second starts mid-sequence
        rows = fused.prompt_logits(ids[:48], chunk_size=1)
        agree = (rows.argmax(-1) == ref[:48].argmax(-1)).float().mean()
        if acts == "int8":
            assert (chunks.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.93
            assert agree >= 0.8
        else:
            assert (chunks.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.97
            assert agree == 1.0 and (rows - ref[:48]).abs().max() < 0.05


def _prefill_once(eng: LLMEngine, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """One C++ step over the prompt ``ids`` (its blocks left allocated): every row's hidden state and the
    cache slots its K/V went to."""
    seq = eng.make_sequence(ids, SamplingParams(max_tokens=1))
    eng.block_manager.grow(seq, len(ids))
    hidden = eng.runner.fused.run(eng.runner.prepare([(seq, len(ids))]), all_rows=True)
    bs = eng.config.block_size
    return hidden, [b * bs + j for b in seq.block_table for j in range(bs)][: len(ids)]


def test_float16_cache_holds_the_float32_values_rounded(ext):
    """The C++ step rounds K and V to float16 as it stores them (to nearest even, as torch's ``half()``):
    after one prefill chunk, a float16 engine's first layer holds the float32 engine's values, rounded (a
    later layer's inputs went through attention over rounded values)."""
    loaded = tiny_loaded(**_INT4)
    kw = dict(dtype="float32", quantization="int4", fused_decode=True, num_threads=2, block_size=4, num_kv_blocks=32,
              enable_prefix_caching=False)
    caches = {}
    for kv in ("float16", "float32"):
        eng = LLMEngine(EngineConfig(kv_cache_dtype=kv, **kw), loaded=loaded)
        _, slots = _prefill_once(eng, _ids(37, 1))
        caches[kv] = (eng.kv.k[0, slots], eng.kv.v[0, slots])
    for half, full in zip(caches["float16"], caches["float32"]):
        assert half.dtype == torch.float16 and torch.equal(half, full.half())


def test_float16_cache_clamps_what_it_cannot_hold(ext):
    """K and V beyond float16's range are stored as its largest finite value, not inf (which would make
    every score of the head NaN): an outlier-heavy layer still gives finite logits."""
    loaded = tiny_loaded(**_INT4)
    for name, w in loaded.weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w.mul_(1e5)  # |K|, |V| up to ~1e5 after the norm
    eng = LLMEngine(EngineConfig(dtype="float32", quantization="int4", fused_decode=True, num_threads=2, block_size=4,
                                 num_kv_blocks=32, enable_prefix_caching=False), loaded=loaded)
    hidden, slots = _prefill_once(eng, _ids(20, 2))
    k, v = eng.kv.k[:, slots].float(), eng.kv.v[:, slots].float()
    assert k.abs().max() == v.abs().max() == 65504 and k.isfinite().all() and v.isfinite().all()
    assert eng.model.compute_logits(hidden).isfinite().all()


def test_torch_path_refuses_a_kv_cache_dtype(ext):
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' .choose 'auto', 'float16' or 'float32'"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype='float16' needs the fused C.. step"):
        LLMEngine(EngineConfig(dtype="float32", quantization=None, kv_cache_dtype="float16", num_kv_blocks=8),
                  loaded=tiny_loaded(**_INT4))


@pytest.mark.parametrize("kv", ["float16", "float32"])
def test_a_row_does_not_depend_on_how_its_prompt_is_cut(ext, kv):
    """Prompt logits are bit-identical however the prompt is cut into prefill chunks (a prefix-cache hit
    cuts it where the cache ends): a query row's attention must not depend on which rows share its column
    of the tiled kernel, nor on a 64-key block it sees no key of, and a row alone (the decode kernel) must
    come out as it does in a chunk."""
    loaded = tiny_loaded(**_INT4, max_position_embeddings=512)
    eng = LLMEngine(EngineConfig(dtype="float32", quantization="int4", fused_decode=True, num_threads=2,
                                 block_size=4, num_kv_blocks=96, enable_prefix_caching=False,
                                 max_num_batched_tokens=256, kv_cache_dtype=kv), loaded=loaded)
    assert eng.kv.k.dtype == getattr(torch, kv)
    ids = _ids(150, 3)  # 150 keys: three 64-key blocks
    whole = eng.prompt_logits(ids, chunk_size=len(ids))
    for k in (2, 3, 5, 10, 37, 59, 61, 63, 65, 70, 100, 127, 129, 148):
        assert torch.equal(eng.prompt_logits(ids, chunk_size=[k, len(ids) - k]), whole), k
    assert torch.equal(eng.prompt_logits(ids, chunk_size=[7, 33, 2, 61]), whole)
    for k in (1, 63, 64, 65, 128, 149):  # one row alone, at and around block edges
        assert torch.equal(eng.prompt_logits(ids, chunk_size=[k, 1, len(ids) - k - 1] if k < 149 else [k, 1]), whole), k
    assert torch.equal(eng.prompt_logits(ids[:70], chunk_size=1), whole[:70])
