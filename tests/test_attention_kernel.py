"""engine/attention_kernel.cpp (`ext.attention`): causal paged attention vs float64 torch SDPA.

The reference gathers each sequence's keys from its slots and runs SDPA in float64 with an explicit
boolean causal mask (row j of a chunk of n rows sees keys 0 .. ctx - n + j). The kernel computes in
float32 (exp2 by a polynomial, 2.3e-7 relative), so outputs (O(1), from q ~ N(0, 4)) must agree to 2e-5
absolute; a wrong mask, slot, head or softmax rescale is off by far more.
"""
from __future__ import annotations

import pytest
import torch

TOL = 2e-5



def _reference(q, kc, vc, seq_start, ctx, slots, nh, nkv, hd, dtype=torch.float64):
    outs = []
    for i, L in enumerate(ctx):
        r0, r1 = seq_start[i], seq_start[i + 1]
        n, prev = r1 - r0, L - (r1 - r0)
        k = kc[slots[i, :L]].to(dtype).transpose(0, 1)  # [nkv, L, hd]
        v = vc[slots[i, :L]].to(dtype).transpose(0, 1)
        mask = torch.arange(L)[None, :] <= (prev + torch.arange(n))[:, None]  # [n, L]
        qq = q[r0:r1, : nh * hd].to(dtype).view(n, nh, hd).transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(qq, k, v, attn_mask=mask, enable_gqa=True)
        outs.append(o.transpose(0, 1).reshape(n, nh * hd))
    return torch.cat(outs)


def _case(ext, rows, prevs, nh, nkv, hd, *, seed=0, paged=False, q_scale=2.0, half=False):
    """Sequences with `rows` new query rows after `prevs` earlier tokens, all in one call; keys in
    random slot order (single slots, or pages of 16 consecutive slots in random page order). With
    `half` the caches are float16, and the output must be bit-identical to that of float32 caches
    holding the same values (the kernel widens each value and computes as it does in float32)."""
    g = torch.Generator().manual_seed(seed)
    ctx = [r + p for r, p in zip(rows, prevs)]
    S = sum(ctx) + 40
    kc, vc = torch.randn(S, nkv, hd, generator=g), torch.randn(S, nkv, hd, generator=g)
    if half:
        kc16, vc16 = kc.half(), vc.half()
        kc, vc = kc16.float(), vc16.float()
    if paged:
        order = (torch.randperm(S // 16, generator=g)[:, None] * 16 + torch.arange(16)).flatten()
    else:
        order = torch.randperm(S, generator=g)
    slots = torch.zeros(len(rows), max(ctx) + 3, dtype=torch.long)
    used = 0
    for i, c in enumerate(ctx):
        slots[i, :c] = order[used: used + c]
        used += c
    seq_start = [0]
    for r in rows:
        seq_start.append(seq_start[-1] + r)
    q = q_scale * torch.randn(seq_start[-1], nh * hd + 5, generator=g)  # a wider row: q_stride > nh * hd
    out = ext.attention(q, kc, vc, torch.tensor(seq_start), torch.tensor(ctx), slots, nh, nkv, hd)
    if half:
        out16 = ext.attention(q, kc16, vc16, torch.tensor(seq_start), torch.tensor(ctx), slots, nh, nkv, hd)
        assert torch.equal(out16, out)
    ref = _reference(q, kc, vc, seq_start, ctx, slots, nh, nkv, hd)
    assert out.shape == (seq_start[-1], nh * hd)
    err = (out.double() - ref).abs().max().item()
    # scores of size |s| carry float32 rounding of ~|s| * 1e-7 into the weights whoever computes them:
    # allow what torch's own float32 SDPA is off by (3x), when that is more than TOL
    tol = TOL
    if q_scale > 2:
        ref32 = _reference(q, kc, vc, seq_start, ctx, slots, nh, nkv, hd, torch.float32)
        tol = max(TOL, 3 * (ref32.double() - ref).abs().max().item())
    assert err < tol, f"rows={rows} prevs={prevs} nh={nh} nkv={nkv} hd={hd}: max error {err:.3g} (tolerance {tol:.3g})"


@pytest.mark.parametrize("hd", [16, 64, 80, 128, 13])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (9, 3), (8, 2)])  # GQA groups 1, 3, 4
def test_mixed_batch(ext, hd, nh, nkv):
    # prefill chunks with and without earlier tokens, decode rows (one short, one long), a 1-row chunk
    _case(ext, [17, 1, 70, 1, 3], [3, 300, 130, 0, 0], nh, nkv, hd, seed=hd * 100 + nh)


@pytest.mark.parametrize("hd", [64, 13])
@pytest.mark.parametrize("threads", [1, 2])
def test_float16_cache(ext, hd, threads):
    """Both kernels (prefill chunks, decode rows with short and long contexts split over threads) and
    the odd-dimension tails on float16 caches."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _case(ext, [17, 1, 70, 1, 3], [3, 300, 130, 0, 1100], 8, 2, hd, seed=hd, half=True)
    finally:
        torch.set_num_threads(prev)


def test_long_prefill_chunk_smollm_shape(ext):
    # 512 rows after 700 earlier tokens and a whole 300-row prompt: many key blocks, the causal edge
    # inside blocks, columns that span two query rows
    _case(ext, [512, 300], [700, 0], 9, 3, 64, paged=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_decode_contexts(ext, threads):
    # B=1 with thousands of keys splits the keys over the threads and merges; B=8 does not split
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _case(ext, [1], [4000], 9, 3, 64, paged=True)
        _case(ext, [1] * 8, [999] * 8, 9, 3, 64, seed=1, paged=True)
        _case(ext, [1, 1], [2500, 37], 8, 2, 80, seed=2)
    finally:
        torch.set_num_threads(before)


def test_sharp_softmax(ext):
    # scores hundreds apart: most weights underflow (exp2 of < -125) and the running max jumps between
    # key blocks, so the online rescaling carries the answer
    _case(ext, [100, 1, 1], [150, 700, 3], 9, 3, 64, seed=3, q_scale=40.0)


def test_prefill_matches_is_causal_sdpa(ext):
    # the plain case the prefill step runs: one whole prompt, slots 0..T-1, vs float32 SDPA is_causal
    T, nh, nkv, hd = 200, 9, 3, 64
    g = torch.Generator().manual_seed(5)
    q, kc, vc = torch.randn(T, nh * hd, generator=g), torch.randn(T, nkv, hd, generator=g), torch.randn(T, nkv, hd, generator=g)
    out = ext.attention(q, kc, vc, torch.tensor([0, T]), torch.tensor([T]), torch.arange(T)[None], nh, nkv, hd)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.view(T, nh, hd).transpose(0, 1), kc.transpose(0, 1), vc.transpose(0, 1), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(0, 1).reshape(T, nh * hd), atol=TOL, rtol=0)


def test_index_checks(ext):
    kc = vc = torch.zeros(8, 1, 4)
    q = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ext.attention(q, kc, vc, torch.tensor([0, 2]), torch.tensor([3]), torch.tensor([[0, 1, 8]]), 1, 1, 4)
    with pytest.raises(RuntimeError, match="query rows and ctx_len"):
        ext.attention(q, kc, vc, torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([[0, 1, 2]]), 1, 1, 4)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ext.attention(q, kc.half(), vc, torch.tensor([0, 2]), torch.tensor([3]), torch.tensor([[0, 1, 2]]), 1, 1, 4)
