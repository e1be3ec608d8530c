"""The fused C++ engine step (``decode_kernel.cpp``): build on first use, fall back clearly.

A decode step of a small model on CPU spends most of its time in per-op dispatch and in torch's
batch-1 int8 kernels; a prefill chunk in its linears and attention. `FusedDecoder` runs all layers
of any step (decode rows, prefill chunks, mixed) in a single C++ call over int8 weights (those
`quant.Int8WeightOnlyLinear` already holds) or int4 groups of 32, with float32 activations and a float16 (or float32) KV
cache; `FusedLinear` serves the lm_head with the same kernels.

The extension is compiled with ``torch.utils.cpp_extension`` (g++ and ninja) for the best instruction
set the CPU runs (`kernel_isa`: AVX-512 VNNI, AVX2+FMA, or scalar loops), chosen at run time, into
torch's extension cache under a name that carries that instruction set, so only the first process
on a machine pays the build (~1 min) and another machine's build never loads. Where it cannot build,
`load_extension` returns None and says why once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant import Int8WeightOnlyLinear

log = logging.getLogger(__name__)
# decode_kernel.cpp holds the step and the bindings; the others the kernels it calls and their thread pool
# (kernels.h)
_SOURCES = [Path(__file__).with_name(f)
            for f in ("decode_kernel.cpp", "linear_kernel.cpp", "attention_kernel.cpp", "thread_pool.cpp")]
_HEADER = Path(__file__).with_name("kernels.h")
_PACK_ROWS = 8192  # rows `FusedLinear.pack` reorders at a time


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# instruction sets the kernels are built for, best first: the compiler flags of each and the CPU flags it needs
_ISA_BUILDS = {
    "avx512-vnni": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                    {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "scalar": ([], set()),
}


def available_isas() -> list[str]:
    """The kernel builds this CPU can run, best first (``scalar`` always)."""
    flags = _cpu_flags()
    return [isa for isa, (_, needs) in _ISA_BUILDS.items() if needs <= flags]


def kernel_isa() -> str:
    """The instruction set of the kernels this process uses: the best this CPU runs ("avx512-vnni", "avx2"
    or "scalar"), or ``$AGENTRT_KERNEL_ISA`` when set to one of those it runs (to compare builds)."""
    forced = os.environ.get("AGENTRT_KERNEL_ISA")
    return forced if forced in available_isas() else available_isas()[0]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, str | None]:
    if os.environ.get("AGENTRT_NO_CPP_DECODE"):
        return None, "AGENTRT_NO_CPP_DECODE is set"
    forced = os.environ.get("AGENTRT_KERNEL_ISA")
    if forced and forced not in available_isas():
        return None, f"AGENTRT_KERNEL_ISA={forced!r}: this CPU runs {', '.join(available_isas())}"
    try:
        from torch.utils import cpp_extension

        isa = kernel_isa()
        # the name carries the instruction set and a hash of the code, so another machine's build or an
        # edited kernel (or header) never loads
        code = hashlib.sha256(b"".join(p.read_bytes() for p in (*_SOURCES, _HEADER))).hexdigest()[:10]
        tag = isa.replace("-", "_") + "_" + code
        name = f"agentrt_decode_{tag}"
        try:
            built = _built_module(name, cpp_extension._get_build_directory(name, verbose=False))
        except ImportError:  # e.g. a build cut short: torch's loader builds it again
            built = None
        if built is not None:
            return built, None
        ext = cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES],
                                 extra_cflags=["-O3", *_ISA_BUILDS[isa][0]],
                                 verbose=False)
        return ext, None
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers: the torch decode path still works
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def _built_module(name: str, build_dir: str) -> Any:
    """The extension ``name`` if its build is in ``build_dir``, imported directly. torch's loader would
    take the build folder's lock file first even to load a finished build, and a process killed while
    holding it (Ctrl-C at start-up) leaves the file behind: every later start would then wait on it
    forever. The name carries the instruction set and the code's hash, so a build under it is current."""
    import importlib.util

    path = Path(build_dir) / f"{name}.so"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension() -> Any:
    """The compiled extension module, or None (with a warning naming the reason, logged once)."""
    ext, why = _load()
    if ext is None and not getattr(load_extension, "_warned", False):
        load_extension._warned = True  # type: ignore[attr-defined]
        log.warning("fused C++ decode unavailable (%s); using the torch decode path", why)
    return ext


def unavailable_reason() -> str | None:
    """Why the extension could not be built (None when it is available)."""
    return _load()[1]


def _int8_parts(mod: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 weight [N, K], float32 scales [N], float32 bias or empty) of a (wrapped) int8 linear."""
    q = getattr(mod, "quantized", mod)  # model.DecodeQuantLinear keeps the int8 copy in .quantized
    if type(q) is nn.Linear:  # not quantized yet: the engine leaves that to the C++ step
        q = Int8WeightOnlyLinear(q.weight, q.bias)
    if not isinstance(q, Int8WeightOnlyLinear):
        raise ValueError(f"fused int8 decode needs int8 weight-only linears; {what} is {type(q).__name__}")
    return q.weight.contiguous(), q.scales.float().contiguous(), _bias(q.bias)


def _bias(b: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if b is None else b.detach().float().contiguous()


def quantize_int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of 32 inputs, the GGUF Q4_1 grid: w ~= d * q + m, q in 0..15, d and m
    float16 (so weights dequantized from a Q4_1 file come back exactly when a group spans 0..15).
    weight [N, K] (K a multiple of 32) -> packed uint8 [N, K/2] (byte j of a group: q[j] low nibble,
    q[j + 16] high nibble), d [N, K/32], m [N, K/32]."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"int4 groups of 32: in_features={k} is not a multiple of 32")
    w = weight.detach().float().reshape(n, k // 32, 32)  # [N, G, 32]
    lo, hi = w.amin(-1), w.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()  # rounded first; q is picked against the rounded values
    df = torch.where(d == 0, torch.ones_like(d), d).float()
    q = (w - m.float()[..., None]).div_(df[..., None]).round_().clamp_(0, 15).to(torch.uint8)  # [N, G, 32]
    packed = q[..., :16] | (q[..., 16:] << 4)  # [N, G, 16]
    return packed.reshape(n, k // 2).contiguous(), d.contiguous(), m.contiguous()


def dequantize_int4_groups(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that `quantize_int4_groups`' output stands for."""
    n, g = d.shape
    p = packed.reshape(n, g, 16)
    q = torch.cat([p & 15, p >> 4], dim=-1).float()  # [N, G, 32]
    return (q * d.float()[..., None] + m.float()[..., None]).reshape(n, g * 32)


def weight_parts(weights: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """[w, s, z] in the kernel order of float weights [N_i, K] stacked along N, each quantized as the engine
    does: int8 rows (`quant.Int8WeightOnlyLinear`'s grid) or int4 groups of 32 (`quantize_int4_groups`)."""
    if mode == "int8":
        qs = [Int8WeightOnlyLinear(w, None) for w in weights]
        grids = [[q.weight, q.scales.float(), torch.empty(0)] for q in qs]
    else:
        grids = [list(quantize_int4_groups(w)) for w in weights]
    parts = [torch.cat([g[i] for g in grids]) if grids[0][i].numel() else grids[0][i] for i in range(3)]
    return FusedLinear.pack(parts, weights[0].shape[1])


def _lin_parts(mod: nn.Module, mode: str, what: str) -> list[torch.Tensor]:
    """[w, s, z] of one linear in the kernel order linear_kernel.cpp's ``Lin`` reads (int8 or int4)."""
    if mode == "int8":
        w, s, _ = _int8_parts(mod, what)
        return FusedLinear.pack([w, s, torch.empty(0)], w.shape[1])
    dense = getattr(mod, "dense", mod)  # int4 packs from the float weight the prefill path keeps
    weight = getattr(dense, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"fused int4 decode needs {what}'s float weight (prefill_int8 replaces it)")
    return weight_parts([weight], "int4")


def quantize_int8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in groups of 32 inputs, the GGUF Q8_0 grid: w ~= d * q, q in -127..127, d float16
    (weights dequantized from a Q8_0 file come back exactly). weight [N, K] -> q int8 [N, K], d [N, K/32]."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"int8 groups of 32: in_features={k} is not a multiple of 32")
    w = weight.detach().float().reshape(n, k // 32, 32)
    d = (w.abs().amax(-1) / 127).half()
    df = torch.where(d == 0, torch.ones_like(d), d).float()
    q = torch.round(w / df[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), d.contiguous()


_SUPER_RECORD = 20  # bytes of super-block scales a column takes per 256 inputs (kernels.h's Lin)


def _super_records(sc: torch.Tensor, mn: torch.Tensor, dd: torch.Tensor, dm: torch.Tensor, nb: int) -> torch.Tensor:
    """Super-block scales of whole blocks of ``nb`` rows (sc, mn uint8 [rows, G]; dd, dm float16 [rows, S]) as
    kernels.h's records: per block and super-block, D [nb], Dm [nb] (float16 bytes), sc [8][nb], mn [8][nb]."""
    rows, s = dd.shape

    def half_bytes(t: torch.Tensor) -> torch.Tensor:  # [rows, S] -> [blocks, S, 2 nb]
        return t.reshape(-1, nb, s).permute(0, 2, 1).contiguous().view(torch.uint8)

    def byte_rows(t: torch.Tensor) -> torch.Tensor:  # [rows, G] -> [blocks, S, 8 nb]
        return t.reshape(-1, nb, s, 8).permute(0, 2, 3, 1).reshape(-1, s, 8 * nb)

    return torch.cat([half_bytes(dd), half_bytes(dm), byte_rows(sc), byte_rows(mn)], -1).reshape(rows, -1)


def super_group_scales(sc: torch.Tensor, mn: torch.Tensor, dd: torch.Tensor,
                       dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's super-block scales (sc, mn uint8 [N, G]; dd, dm float16 [N, G/8]) as (d, m) float32 [N, G]:
    d = D sc, m = -(Dm mn), the float32 products the kernel makes."""
    n, g = sc.shape
    d = dd.float().repeat_interleave(8, dim=1) * sc.float()
    return d.reshape(n, g), -(dm.float().repeat_interleave(8, dim=1) * mn.float()).reshape(n, g)


def dequantize_int6(q: torch.Tensor, sc: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] of Q6_K's grid (q uint8 [N, K] 0..63, sc int8 [N, K/16], D float16 [N, K/256]):
    w = D sc (q - 32) per 16 inputs."""
    n, k = q.shape
    d = dd.float().repeat_interleave(16, dim=1) * sc.float()  # [N, K/16]
    return ((q.float() - 32).reshape(n, k // 16, 16) * d[..., None]).reshape(n, k)


def _super_scales(rec: torch.Tensor, col: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, m) float32 [T, G] of column ``col`` [T] of the block records ``rec`` [T, S, 20 nb]."""
    t, s = rec.shape[:2]
    pick = torch.arange(t)

    def halves(i: int) -> torch.Tensor:  # D (i = 0) or Dm (1): [T, S] float16
        return rec[..., 2 * nb * i:2 * nb * (i + 1)].contiguous().view(torch.float16)[pick, :, col]

    def bytes_(i: int) -> torch.Tensor:  # sc (i = 0) or mn (1): [T, G]
        return rec[..., (4 + 8 * i) * nb:(12 + 8 * i) * nb].reshape(t, s, 8, nb)[pick, :, :, col].reshape(t, -1)

    return super_group_scales(bytes_(0), bytes_(1), halves(0), halves(1))


_SIX_RECORD = 18  # bytes of int6 scales a column takes per 256 inputs
NO_LINEAR = [torch.empty(0)] * 3  # a layer's v (w, s, z) where qkv holds it


def _spans(n: int) -> list[tuple[int, int]]:
    """Row chunks of at most _PACK_ROWS (multiples of 8, so every block but the last is whole): whole blocks
    of 8 rows first, then the short one."""
    full = n // 8 * 8
    return [(a, min(full, a + _PACK_ROWS)) for a in range(0, full, _PACK_ROWS)] + ([(full, n)] if full < n else [])


def _planes_rows(q: torch.Tensor, nb: int, bits: int) -> torch.Tensor:
    """Rows of q uint8 [rows, K] (0..2^bits - 1; whole blocks of ``nb`` rows) in kernels.h's int5 / int6 weight
    order: per block and group the low 4 bits as int4 stores them, then the high bits: int5 one plane (step i's
    bit at bit i), int6 two (step 4p + j's 2 bits at bits 2j of plane p). [rows, bits K / 8]."""
    rows, g = q.shape[0], q.shape[1] // 32
    qq = q.reshape(-1, nb, g, 8, 4)  # [blocks, column, group, step, input]
    low = qq & 15
    nibbles = (low[:, :, :, :4] | (low[:, :, :, 4:] << 4)).permute(0, 2, 3, 1, 4)  # [blocks, G, 4, column, 4]
    if bits == 5:
        high = sum(((qq[:, :, :, i] >> 4) & 1) << i for i in range(8)).permute(0, 2, 1, 3)  # [blocks, G, column, 4]
    else:
        two = (qq >> 4).reshape(-1, nb, g, 2, 4, 4)  # [blocks, column, group, plane, step in plane, input]
        high = sum(two[:, :, :, :, i] << (2 * i) for i in range(4)).permute(0, 2, 3, 1, 4)  # [blocks, G, 2, column, 4]
    return torch.cat([nibbles.reshape(-1, g, 16 * nb), high.reshape(-1, g, 4 * (bits - 4) * nb)], -1).reshape(rows, -1)


def _planes_values(w: torch.Tensor, blk: torch.Tensor, col: torch.Tensor, nb: int, bits: int) -> torch.Tensor:
    """q uint8 [T, K] of rows (block ``blk``, column ``col`` [T]) of weights ``w`` in `_planes_rows`' order."""
    t, g = blk.shape[0], w.shape[1] // (4 * bits)
    b = w.reshape(-1, g, bits, nb, 4)[blk, :, :, col]  # [T, G, chunks, 4]: 4 nibble steps, then the planes
    low = torch.cat([(b[:, :, :4] & 15).reshape(t, g, 16), (b[:, :, :4] >> 4).reshape(t, g, 16)], -1)
    if bits == 5:
        high = torch.stack([(b[:, :, 4] >> i) & 1 for i in range(8)], dim=2)  # [T, G, step, 4]
    else:
        high = torch.stack([(b[:, :, 4:] >> (2 * i)) & 3 for i in range(4)], dim=3)  # [T, G, plane, step, 4]
    return (low | (high.reshape(t, g, 32) << 4)).reshape(t, -1)


def _pack_int5(q: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, dd: torch.Tensor, dm: torch.Tensor,
               k: int) -> list[torch.Tensor]:
    """Q5_K's grid (q uint8 [N, K] 0..31 and Q4_K's super-block scales) in kernels.h's int5 order: the weights
    as `_planes_rows`, the scales as Q4_K's records."""
    n = q.shape[0]
    if k % 256 or q.shape[1] != k:
        raise ValueError(f"int5 needs q [N, K] with K % 256 == 0 (K={k})")
    out_w = torch.empty(n, k // 8 * 5, dtype=torch.uint8)
    out_s = torch.empty(n, k // 256 * _SUPER_RECORD, dtype=torch.uint8)
    for a, b in _spans(n):
        nb = min(8, b - a)
        out_w[a:b] = _planes_rows(q[a:b], nb, 5)
        out_s[a:b] = _super_records(sc[a:b], mn[a:b], dd[a:b], dm[a:b], nb)
    return [out_w, out_s, torch.empty(0)]


def _pack_int6(q: torch.Tensor, sc: torch.Tensor, dd: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Q6_K's grid (q uint8 [N, K] 0..63, sc int8 [N, K/16], D float16 [N, K/256]) in kernels.h's int6 order:
    the weights as `_planes_rows`; per block and super-block a record of D [nb] and sc [16][nb]."""
    n = q.shape[0]
    if k % 256 or q.shape[1] != k:
        raise ValueError(f"int6 needs q [N, K] with K % 256 == 0 (K={k})")
    s = k // 256
    out_w = torch.empty(n, k // 4 * 3, dtype=torch.uint8)
    out_s = torch.empty(n, s * _SIX_RECORD, dtype=torch.int8)
    for a, b in _spans(n):
        nb = min(8, b - a)
        out_w[a:b] = _planes_rows(q[a:b], nb, 6)
        d = dd[a:b].reshape(-1, nb, s).permute(0, 2, 1).contiguous().view(torch.uint8)  # [blocks, S, 2 nb]
        scales = sc[a:b].reshape(-1, nb, s, 16).permute(0, 2, 3, 1).contiguous().view(torch.uint8)
        out_s[a:b] = torch.cat([d, scales.reshape(-1, s, 16 * nb)], -1).view(torch.int8).reshape(b - a, -1)
    return [out_w, out_s, torch.empty(0)]


def _int6_rows(w: torch.Tensor, rec: torch.Tensor, blk: torch.Tensor, col: torch.Tensor, nb: int) -> torch.Tensor:
    """Rows (block ``blk``, column ``col`` [T]) of packed int6 weights ``w`` / records ``rec`` as float32 [T, K]."""
    t, s = blk.shape[0], rec.shape[1] // _SIX_RECORD
    pick = torch.arange(t)
    r = rec.reshape(-1, s, _SIX_RECORD * nb)[blk]  # [T, S, 18 nb]
    d = r[..., :2 * nb].contiguous().view(torch.float16)[pick, :, col]  # [T, S]
    sc = r[..., 2 * nb:].reshape(t, s, 16, nb)[pick, :, :, col]  # [T, S, 16] int8
    return dequantize_int6(_planes_values(w, blk, col, nb, 6), sc.reshape(t, -1), d)


def _int5_rows(w: torch.Tensor, rec: torch.Tensor, blk: torch.Tensor, col: torch.Tensor, nb: int) -> torch.Tensor:
    """Rows (block ``blk``, column ``col`` [T]) of packed int5 weights ``w`` / super-block records ``rec`` as
    float32 [T, K]: d q + m, the products the kernel makes."""
    t, g = blk.shape[0], w.shape[1] // 20
    d, m = _super_scales(rec.reshape(-1, g // 8, _SUPER_RECORD * nb)[blk], col, nb)  # [T, G]
    q = _planes_values(w, blk, col, nb, 5).reshape(t, g, 32).float()
    return (q * d[..., None] + m[..., None]).reshape(t, -1)


def _scale_dtype(*scales: torch.Tensor) -> torch.dtype:
    """float16 when every value of ``scales`` is a float16 value exactly (the kernels read either), else float32."""
    for t in scales:
        if t.numel() and t.dtype != torch.float16 and not torch.equal(t.half().float(), t.float()):
            return torch.float32
    return torch.float16


class FusedLinear(nn.Module):
    """A linear run by linear_kernel.cpp in float32 (activations rounded to int8 per block of 32, or with
    ``int16`` int8 plus its rounding residual) from the plain grid ``parts`` (packed into the kernel's
    order here, see `pack`, unless ``packed``: they are in it already): int8 rows, int8 or int4 groups.
    Used for the lm_head (only the sampled rows reach it)."""

    def __init__(self, parts: list[torch.Tensor], bias: torch.Tensor, in_features: int, ext: Any,
                 int16: bool = False, packed: bool = False):
        super().__init__()
        self.ext, self.in_features, self.out_features, self.int16 = ext, in_features, parts[0].shape[0], int16
        w, s, z = parts if packed else self.pack(parts, in_features)
        self.register_buffer("weight", w)
        self.register_buffer("scales", s)
        self.register_buffer("zeros", z)
        self.register_buffer("bias", bias)

    @staticmethod
    def pack(parts: list[torch.Tensor], in_features: int) -> list[torch.Tensor]:
        """Plain grid parts -> [w, s, z] in the kernel order kernels.h's ``Lin`` documents. ``parts``:
        int8 rows [int8 [N, K], float32 scales [N], empty], int8 groups [int8 [N, K], float16 d [N, K/32],
        empty], int4 groups [packed uint8 [N, K/2], float16 d, float16 m] (`quantize_int4_groups`), or a GGUF's
        Q4_K super-blocks, Q5_K (int5) or Q6_K (int6) as `gguf_grids.Grid` holds them.
        The scales (and mins) are stored as float16 when every one of them is a float16 value exactly, else
        float32. Output rows go in blocks of 8 (the last one may be shorter), each stored where its rows would be,
        with the 32 inputs of a group as steps of 4 consecutive inputs, each step holding all the block's
        columns: one 32-byte load then serves 8 columns (int4: two steps, low and high nibbles)."""
        if parts[1].dtype == torch.int8:
            return _pack_int6(*parts, in_features)
        if len(parts) == 5 and parts[0].shape[1] == in_features:  # q a byte per input: int5 (Q5_K)
            return _pack_int5(*parts, in_features)
        w, s, z = parts[:3]
        n, k = w.shape[0], in_features
        g = -(-k // 32)
        int4 = w.dtype == torch.uint8
        if int4 and (k % 32 or w.shape[1] * 2 != k):
            raise ValueError(f"int4 groups need packed uint8 [N, K/2] with K % 32 == 0 (K={k})")
        super_blocks = len(parts) == 5
        if super_blocks and k % 256:
            raise ValueError(f"super-block scales need K % 256 == 0 (K={k})")
        int8_rows = not int4 and s.dtype == torch.float32 and s.numel() == n
        if not int4 and not int8_rows and k % 32:
            raise ValueError(f"int8 groups need K % 32 == 0 (K={k})")
        scale_dtype = torch.uint8 if super_blocks else _scale_dtype(s, z)
        out_w = torch.empty(n, g * 16 if int4 else g * 32, dtype=w.dtype)
        out_d = torch.empty(n, g // 8 * _SUPER_RECORD if super_blocks else g, dtype=scale_dtype)
        out_m = torch.empty(n, g, dtype=scale_dtype) if int4 and not super_blocks else torch.empty(0)
        for a, b in _spans(n):  # row chunks bound the scratch of a large embedding
            nb = min(8, b - a)
            if int4:
                p = w[a:b].reshape(b - a, g, 16)
                q = torch.cat([p & 15, p >> 4], -1)  # [rows, G, 32], 0..15
                m = torch.empty(0)  # the mins' place: the super-block records hold them
                if not super_blocks:
                    d, m = s[a:b].float().reshape(b - a, g), z[a:b].float().reshape(b - a, g)
            elif int8_rows:  # the row scale in every group, K padded
                q = torch.nn.functional.pad(w[a:b], (0, g * 32 - k)).reshape(b - a, g, 32)
                d, m = s[a:b].reshape(b - a, 1).expand(b - a, g), None
            else:
                q, d, m = w[a:b].reshape(b - a, g, 32), s[a:b].float().reshape(b - a, g), None
            qq = q.reshape(-1, nb, g, 8, 4)  # [blocks, column, group, step, input]
            if m is not None:  # int4: steps 0..3 in the low nibbles, 4..7 in the high
                qq = qq[:, :, :, :4] | (qq[:, :, :, 4:] << 4)
            out_w[a:b] = qq.permute(0, 2, 3, 1, 4).reshape(b - a, -1)  # [blocks, group, step, column, input]
            if super_blocks:
                out_d[a:b] = _super_records(*(t[a:b] for t in parts[1:]), nb)
                continue
            out_d[a:b] = d.reshape(-1, nb, g).permute(0, 2, 1).reshape(b - a, g)
            if m is not None:
                out_m[a:b] = m.reshape(-1, nb, g).permute(0, 2, 1).reshape(b - a, g)
        return [out_w, out_d, out_m]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Weight rows ``ids`` [T] as float32 [T, K], read back from the packed order (an embedding
        lookup from the same copy the lm_head multiplies by)."""
        n, g = self.weight.shape[0], -(-self.in_features // 32)
        full = n // 8 * 8
        out = torch.empty(ids.shape[0], g * 32)
        in_full = ids < full
        for sel, lo, hi in ((in_full, 0, full), (~in_full, full, n)):
            if not bool(sel.any()):
                continue
            nb = min(8, hi - lo)
            r = ids[sel] - lo
            blk, col = r // nb, r % nb
            if self.scales.dtype == torch.int8:  # int6
                out[sel] = _int6_rows(self.weight[lo:hi], self.scales[lo:hi], blk, col, nb)
                continue
            if self.scales.dtype == torch.uint8 and self.weight.shape[1] == g * 20:  # int5
                out[sel] = _int5_rows(self.weight[lo:hi], self.scales[lo:hi], blk, col, nb)
                continue
            w = self.weight[lo:hi].reshape(-1, g, self.weight.shape[1] // g // 4, nb, 4)[blk, :, :, col]
            if self.scales.dtype == torch.uint8:  # super-block records [S][20 nb]
                d, m = _super_scales(self.scales[lo:hi].reshape(-1, g // 8, _SUPER_RECORD * nb)[blk], col, nb)
            else:
                d = self.scales[lo:hi].reshape(-1, g, nb)[blk, :, col].float()  # [t, G]
                m = self.zeros[lo:hi].reshape(-1, g, nb)[blk, :, col].float() if self.zeros.numel() else None
            if self.weight.dtype == torch.uint8:  # int4: [t, G, 4 steps, 4] bytes, low nibbles inputs 0..15, high 16..31
                q = torch.cat([(w & 15).reshape(-1, g, 16), (w >> 4).reshape(-1, g, 16)], -1).float()
                vals = q * d[..., None] + m[..., None]
            else:  # int8: [t, G, 8 steps, 4]
                vals = w.reshape(-1, g, 32).float() * d[..., None]
            out[sel] = vals.reshape(-1, g * 32)
        return out[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        shape = x.shape
        y = self.ext.linear(x.reshape(-1, self.in_features).float(), self.weight, self.scales, self.zeros, self.bias,
                            self.int16)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def lm_head_linear(args: Any, embedding: torch.Tensor, int8_head: Int8WeightOnlyLinear | None, ext: Any,
                   int16: bool = False) -> FusedLinear:
    """The lm_head as a `FusedLinear`: int8 groups of 32 from the float embedding when tied (exact for a
    Q8_0 GGUF embedding), else the int8 rows of ``int8_head`` (made from the embedding when None)."""
    h = args.hidden_size
    if args.tie_word_embeddings and h % 32 == 0:
        q, d = quantize_int8_groups(embedding)
        return FusedLinear([q, d, torch.empty(0)], torch.empty(0), h, ext, int16)
    w, s, b = _int8_parts(int8_head or Int8WeightOnlyLinear(embedding, None), "lm_head")
    return FusedLinear([w, s, torch.empty(0)], b, h, ext, int16)


def fused_lm_head(model: nn.Module, ext: Any, int16: bool = False) -> FusedLinear | None:
    """`lm_head_linear` for a built model whose lm_head the engine made int8; None when it is not int8."""
    if not isinstance(model.lm_head, Int8WeightOnlyLinear):
        return None
    return lm_head_linear(model.args, model.embed_tokens.weight, model.lm_head, ext, int16)


class PackedEmbedding(nn.Module):
    """The token embedding read from a `FusedLinear`'s packed rows (the tied lm_head's own copy, or the
    GGUF's token_embd on its grid): no float32 table is kept."""

    def __init__(self, table: FusedLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [T] -> [T, H] float32
        return self.table.rows(ids.reshape(-1)).reshape(*ids.shape, self.table.in_features)


def layer_parts(model: nn.Module, mode: str) -> list[torch.Tensor]:
    """The C++ step's 18 tensors per layer (qkv w/s/z and bias, v w/s/z (empty: v is in qkv), o, gate_up and
    down w/s/z, the two norms),
    packed from ``model``'s own linears: int8 copies of its `Int8WeightOnlyLinear`s (possibly inside
    `DecodeQuantLinear`) or int4 groups of 32 quantized from the dense weights it keeps."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"fused decode mode {mode!r}: choose 'int8' or 'int4'")
    parts: list[torch.Tensor] = []
    for i, layer in enumerate(model.layers):
        qkv = layer.qkv_proj
        # the bias from the float linear when there is one (the quantized copies round it to bfloat16)
        bias = getattr(getattr(qkv, "dense", None), "bias", getattr(qkv, "quantized", qkv).bias)
        parts += _lin_parts(qkv, mode, f"layers.{i}.qkv_proj") + [_bias(bias)] + NO_LINEAR
        for name in ("o_proj", "gate_up_proj", "down_proj"):
            parts += _lin_parts(getattr(layer, name), mode, f"layers.{i}.{name}")
        parts += [layer.input_layernorm.float().contiguous(), layer.post_attention_layernorm.float().contiguous()]
    return parts


class FusedDecoder:
    """An engine step of a float32 `LlamaModel` (decode rows and prefill chunks, any mix) as one C++
    call (``ext.step``) over ``parts``, 18 packed tensors per layer (`layer_parts`, or a GGUF's own grids:
    `fused_model`); the model gives the embedding, final norm and RoPE tables. The linears beat torch's
    float32 mm at every row count (int4 / mm time 0.29 at 8 rows .. 0.60 at 1,024 on SmolLM2's layer
    shapes), so prefill chunks use them too. ``activations`` ("int8" or "int16", see
    `EngineConfig.fused_activations`) is the linears' input precision for every row."""

    def __init__(self, model: nn.Module, ext: Any, parts: list[torch.Tensor], activations: str = "int8"):
        if activations not in ("int8", "int16"):
            raise ValueError(f"fused activations {activations!r}: choose 'int8' or 'int16'")
        if model.norm.dtype != torch.float32 or model.norm.device.type != "cpu":
            raise ValueError("fused decode needs a float32 model on CPU")
        self.int16 = activations == "int16"
        self.ext, self.model, self.args = ext, model, model.args
        self.parts = parts  # 18 per layer, the order decode_kernel.cpp reads
        self.norm = model.norm.float().contiguous()
        # seconds in the linears, attention and the rest, summed over steps while not None (bench splits)
        self.timings: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, seq_start: torch.Tensor, ctx_len: torch.Tensor,
                 block_tables: torch.Tensor, block_size: int, out_rows: torch.Tensor | None, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
        """One step: input_ids [T] (sequence after sequence), seq_start [B + 1] (sequence i's rows
        seq_start[i]:seq_start[i + 1]), ctx_len [B] (its tokens after the step), block_tables [B, W]
        (its KV blocks of ``block_size`` slots), out_rows [R] (rows to return; None = all);
        k_cache/v_cache [layers, slots, nkv, hd] float32 or float16 (the new K/V are written). Returns hidden [R, H]."""
        a, m = self.args, self.model
        x = m.embed_tokens(input_ids)  # [T, H], a fresh tensor the kernel updates
        return self.ext.step(x, seq_start, ctx_len, block_tables, block_size, out_rows, m.rope_cos, m.rope_sin,
                             k_cache, v_cache, self.parts, self.norm, a.num_heads, a.num_kv_heads, a.head_dim,
                             a.rms_norm_eps, self.int16, self.timings)


def build_fused_decoder(model: nn.Module, mode: str = "int8", activations: str = "int8") -> FusedDecoder | None:
    """A `FusedDecoder` (``mode`` int8 or int4; ``activations`` int8 or int16) for ``model`` with its int8
    lm_head swapped for a `FusedLinear` of the same activation precision (see `fused_lm_head`); None (with
    a logged reason) when the extension is unavailable."""
    ext = load_extension()
    if ext is None:
        return None
    dec = FusedDecoder(model, ext, layer_parts(model, mode), activations)
    head = fused_lm_head(model, ext, dec.int16)
    if head is not None:
        model.lm_head = head
    return dec
