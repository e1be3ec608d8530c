"""engine/linear_kernel.cpp (`ext.linear`) against a float64 reference of the dequantized weights, for
every kind of `Lin` (int8 rows, int8 groups, int4 groups), batch sizes across the 4-row tiles and the
128-row chunks, and output counts with tails of the 8-column blocks.

Tolerance: the kernel rounds each block of 32 activations to int8 (step = the block's max|x| / 127), so
|y - ref| <= sum over blocks of step / 2 * sum |w| in the block, plus float32 summation (1e-5 here).
Activations already on that grid must come out exact up to float32 summation alone. With ``int16`` the
kernel also multiplies what the rounding left, rounded to step / 254: 254x tighter. A row's result never
depends on the other rows of the call."""
from __future__ import annotations

import time

import pytest
import torch

from agentrt.engine import decode_fused
from agentrt.engine.quant import Int8WeightOnlyLinear

KINDS = ["int8_rows", "int8_groups", "int4_groups"]
MS = [1, 3, 4, 5, 8, 17, 64, 130]



def _linear(kind: str, n: int, k: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(plain grid parts, the float64 weight [n, k] they stand for)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    if kind == "int8_rows":
        q = Int8WeightOnlyLinear(w, None)
        s = q.scales.float()
        return [q.weight, s, torch.empty(0)], q.weight.double() * s.double()[:, None]
    if kind == "int8_groups":
        q, d = decode_fused.quantize_int8_groups(w)
        return [q, d, torch.empty(0)], q.double() * d.double().repeat_interleave(32, 1)
    parts = list(decode_fused.quantize_int4_groups(w))
    return parts, decode_fused.dequantize_int4_groups(*parts).double()


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N]: the int8 activation rounding bound (see the module docstring) plus 1e-5."""
    g = -(-x.shape[1] // 32)
    pad = (0, g * 32 - x.shape[1])
    step = torch.nn.functional.pad(x.abs().double(), pad).reshape(len(x), g, 32).amax(-1) / 127
    wsum = torch.nn.functional.pad(w.abs(), pad).reshape(len(w), g, 32).sum(-1)
    return step / 2 @ wsum.T + 1e-5


@pytest.mark.parametrize("int16", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", [(13, 96), (8, 32), (203, 64), (1, 160)])
def test_linear_matches_float64(ext, kind, n, k, int16):
    parts, w = _linear(kind, n, k)
    packed = decode_fused.FusedLinear.pack(parts, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    x = torch.randn(max(MS), k, generator=torch.Generator().manual_seed(2)) * 3
    x[5, 7] = 40.0  # an outlier coarsens only its own block's step
    for m in MS:
        for b in (bias, torch.empty(0)):
            y = ext.linear(x[:m], *packed, b, int16=int16)
            assert y.shape == (m, n) and y.dtype == torch.float32
            ref = x[:m].double() @ w.T + (b.double() if b.numel() else 0)
            err = (y.double() - ref).abs()
            tight = 254 if int16 else 1  # int8 plus its rounding residual, see the docstring
            assert (err <= (_bound(x[:m], w) - 1e-5) / tight + 1e-5).all(), (kind, m, err.max().item())
            # every row as computed alone: the row count never changes a row's numbers (batch invariance)
            assert torch.equal(y[m - 1:], ext.linear(x[m - 1:m], *packed, b, int16=int16)), (kind, m)


@pytest.mark.parametrize("kind", KINDS)
def test_int8_rows_any_k_and_grid_activations_are_exact(ext, kind):
    """K not a multiple of 32 (int8 rows are padded with zero weights) and activations on the int8 grid
    (each block's max is 127 steps) leave only float32 summation error."""
    k = 40 if kind == "int8_rows" else 64
    n = 21
    parts, w = _linear(kind, n, k, seed=3)
    packed = decode_fused.FusedLinear.pack(parts, k)
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (9, k), generator=g).float()
    q[:, ::32] = 127  # every block's max is exactly 127 steps
    x = q * 2.0 ** -5  # powers of two: x / step is exactly q
    y = ext.linear(x, *packed, torch.empty(0))
    ref = x.double() @ w.T
    assert ((y.double() - ref).abs() <= 1e-5 * (1 + ref.abs())).all(), (y.double() - ref).abs().max()


def test_wrong_shapes_raise(ext):
    parts, _ = _linear("int4_groups", 16, 64)
    packed = decode_fused.FusedLinear.pack(parts, 64)
    with pytest.raises(RuntimeError, match="K a multiple of 32|K/2"):
        ext.linear(torch.randn(2, 63), *packed, torch.empty(0))
    w, d, m = packed
    with pytest.raises(RuntimeError, match="scales' dtype"):
        ext.linear(torch.randn(2, 64), w, d.half(), m.float(), torch.empty(0))
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ext.linear(torch.randn(2, 64), w, d.double(), m.double(), torch.empty(0))
    with pytest.raises(RuntimeError, match="bias"):
        ext.linear(torch.randn(2, 64), *packed, torch.zeros(15))
    with pytest.raises(ValueError, match="K % 32"):
        decode_fused.FusedLinear.pack(list(decode_fused.quantize_int8_groups(torch.zeros(4, 64))) + [torch.empty(0)], 63)


def test_pack_layout_is_the_documented_order():
    """kernels.h's order for one whole block of 8 rows and the short last block: int4 byte
    ((g * 4 + i) * nb + c) * 4 + r holds q[c][32g + 4i + r] | q[c][32g + 16 + 4i + r] << 4."""
    n, k = 11, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5))
    packed, d, m = decode_fused.quantize_int4_groups(w)
    p = packed.reshape(n, 2, 16)
    q = torch.cat([p & 15, p >> 4], -1).reshape(n, k)  # [N, K] nibbles
    kw, kd, _ = decode_fused.FusedLinear.pack([packed, d, m], k)
    flat, dflat = kw.reshape(-1), kd.reshape(-1)
    for row in range(n):
        blk, c = divmod(row, 8)
        nb = min(8, n - 8 * blk)
        base = 8 * blk * (k // 2)
        for g in range(2):
            assert dflat[8 * blk * 2 + g * nb + c] == d[row, g].float()
            for i in range(4):
                for r in range(4):
                    byte = int(flat[base + ((g * 4 + i) * nb + c) * 4 + r])
                    assert byte & 15 == q[row, 32 * g + 4 * i + r] and byte >> 4 == q[row, 32 * g + 16 + 4 * i + r]


@pytest.mark.parametrize("kind", ["int4_groups", "int8_groups"])
@pytest.mark.parametrize("n", [16, 13])  # whole blocks of 8 and a short last block
def test_float16_scales_give_the_float32_results_exactly(ext, kind, n):
    """Scales that are float16 values are packed as float16 (5 bits a 4-bit weight, not 6), and the kernel
    reading them gives bit for bit what it gives with the same values in float32; scales that are not
    float16 values stay float32."""
    parts, _ = _linear(kind, n, 96)
    packed = decode_fused.FusedLinear.pack(parts, 96)
    assert packed[1].dtype == torch.float16
    as_f32 = [packed[0], packed[1].float(), packed[2].float() if packed[2].numel() else packed[2]]
    x = torch.randn(5, 96)
    for int16 in (False, True):
        assert torch.equal(ext.linear(x, *packed, torch.empty(0), int16), ext.linear(x, *as_f32, torch.empty(0), int16))
    inexact = [parts[0], parts[1].float() * (1 + 2.0 ** -14), parts[2]]  # not float16 values any more
    assert decode_fused.FusedLinear.pack(inexact, 96)[1].dtype == torch.float32


def _parallel_case(ext):
    parts, _ = _linear("int4_groups", 256, 512)
    packed = decode_fused.FusedLinear.pack(parts, 512)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))  # enough work for every thread
    return packed, x, ext.linear(x, *packed, torch.empty(0), False)


def test_kernels_give_the_same_results_from_several_threads_at_once(ext):
    """The kernels' thread pool serves one call at a time; calls from other threads meanwhile run inline,
    with the same numbers (a row never depends on how the work was split)."""
    import threading

    packed, x, expected = _parallel_case(ext)
    wrong: list[int] = []

    def worker(i: int) -> None:
        for _ in range(20):
            if not torch.equal(ext.linear(x, *packed, torch.empty(0), False), expected):
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not wrong


def test_a_forked_child_runs_the_kernels(ext):
    """A child forked after the pool started its workers has none of them: it starts its own (rather than
    waiting forever on threads that do not exist in it)."""
    import os

    packed, x, expected = _parallel_case(ext)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 when the kernel runs and agrees
        ok = torch.equal(ext.linear(x, *packed, torch.empty(0), False), expected)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in the kernels")
