"""GGUF tensors straight onto the fused step's weight grids, without a float32 copy of the model.

Each 2-D weight of a GGUF is read from the file (``os.pread`` of its bytes, so no mapping keeps the
file's pages resident) and turned into the plain grid `decode_fused.FusedLinear.pack` takes:

* int4 groups of 32, w = d * q + m (q 0..15, float32 d and m): Q4_0 and Q4_1 land here exactly
  (each block's values come back bit for bit as ``gguf.quants.dequantize`` gives them); Q4_K keeps its
  super-block scales (w = D sc q - Dm mn: float16 D and Dm per 256 inputs, 6-bit sc and mn per group), which
  the kernels read as they are;
* int5, Q5_K's own form (w = D sc q - Dm mn as Q4_K, q 0..31): Q5_K exactly;
* int6, Q6_K's own form (w = D sc_h (q - 32), q 0..63, an int8 sc_h per 16 inputs): Q6_K exactly;
* int8 groups of 32, w = d * q (q -127..127, float16 d): Q8_0 and Q5_0 (q - 16) exactly; Q5_1, IQ4 and
  float tensors are dequantized one row chunk at a time and rounded onto it (at most half a step of the
  group's max / 127 off).

Weights the step runs as one linear (gate/up, q/k) but came on different grids run on int8: the other
parts are rounded onto int8 groups the same way. A v on another grid than q and k (a Q4_K_M file keeps
some layers' attn_v in Q6_K) runs as a linear of its own.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# quant type -> the grid it reads onto
GRID_OF = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8", "Q5_0": "int8", "Q5_1": "int8",
           "Q5_K": "int5", "Q6_K": "int6", "IQ4_NL": "int8", "IQ4_XS": "int8", "F32": "int8", "F16": "int8",
           "BF16": "int8"}
SUPPORTED = tuple(GRID_OF)
_EXACT = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0")  # read bit for bit; the others are rounded onto int8
_ROW_CHUNK = 4096  # rows dequantized at once where a tensor is rounded onto int8 (bounds the float32 scratch)


class UnsupportedQuantError(ValueError):
    """A GGUF tensor's quantization has no grid here (the message names it and the supported ones)."""


@dataclass
class Grid:
    """A weight [N, K] on one of the fused step's grids, in plain row order (`FusedLinear.pack`'s input):
    int4: [packed uint8 [N, K/2] (a group's q[j] low nibble, q[j + 16] high), d float32 [N, G], m float32 [N, G]];
    int4 with super-block scales (Q4_K): [packed, sc uint8 [N, G], mn uint8 [N, G], D float16 [N, G/8],
    Dm float16 [N, G/8]], standing for d = D sc, m = -(Dm mn);
    int5 (Q5_K): [q uint8 [N, K] (0..31), sc, mn, D, Dm as Q4_K's], w = d q + m;
    int6 (Q6_K): [q uint8 [N, K] (0..63), sc int8 [N, K/16], D float16 [N, K/256]], w = D sc (q - 32) per 16;
    int8: [q int8 [N, K], d float16 [N, G], empty]. G = K / 32."""

    parts: list[torch.Tensor]

    @property
    def kind(self) -> str:
        if self.parts[0].dtype == torch.int8:
            return "int8"
        if self.parts[1].dtype == torch.int8:
            return "int6"
        # int5's q has a byte per input, int4's packs two: [N, K] against G = K / 32 groups of scales
        return "int5" if self.super_blocks and self.parts[0].shape[1] == 32 * self.parts[1].shape[1] else "int4"

    @property
    def super_blocks(self) -> bool:
        """int4 or int5 with Q4_K's super-block scales."""
        return len(self.parts) == 5

    @property
    def rows(self) -> int:
        return self.parts[0].shape[0]

    def group_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, m) float32 [N, G] of an int4 or int5 grid."""
        from .decode_fused import super_group_scales

        return super_group_scales(*self.parts[1:]) if self.super_blocks else (self.parts[1], self.parts[2])

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] this grid stands for."""
        from .decode_fused import dequantize_int4_groups, dequantize_int6

        if self.kind == "int4":
            return dequantize_int4_groups(self.parts[0], *self.group_scales())
        if self.kind == "int5":
            d, m = self.group_scales()
            n, g = d.shape
            return (self.parts[0].float().reshape(n, g, 32) * d[..., None] + m[..., None]).reshape(n, g * 32)
        if self.kind == "int6":
            return dequantize_int6(*self.parts)
        w, d, _ = self.parts
        n, g = d.shape
        return (w.float().reshape(n, g, 32) * d.float()[..., None]).reshape(n, g * 32)

    def to_int8(self) -> Grid:
        """This weight on the int8 grid (itself when it is there already)."""
        if self.kind == "int8":
            return self
        from .decode_fused import quantize_int8_groups

        return Grid([*quantize_int8_groups(self.dequantize()), torch.empty(0)])

    def to_group_scales(self) -> Grid:
        """This int4 weight with float32 d and m per group (the same values)."""
        return Grid([self.parts[0], *self.group_scales()]) if self.super_blocks else self

    @staticmethod
    def cat(grids: list[Grid]) -> Grid:
        """Stack weights with the same K along their rows (int8 when any of them is; int4 with group scales
        when their scales differ in form)."""
        if len({g.kind for g in grids}) > 1:
            grids = [g.to_int8() for g in grids]
        elif len({g.super_blocks for g in grids}) > 1:
            grids = [g.to_group_scales() for g in grids]
        parts = [torch.cat([g.parts[i] for g in grids]) for i in range(len(grids[0].parts))]
        return Grid(parts if grids[0].kind != "int8" else [*parts[:2], torch.empty(0)])


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a GGUF file is (the attributes of ``gguf.ReaderTensor`` this module reads)."""

    name: str
    shape: tuple[int, ...]  # innermost first, as GGUF stores it: a weight [N, K] is (K, N)
    tensor_type: Any  # gguf.GGMLQuantizationType
    data_offset: int  # from the start of the file


# GGUF metadata value types -> struct format of the fixed-size ones; 8 = string, 9 = array
_SCALAR_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZE = {kind: struct.calcsize(fmt) for kind, fmt in _SCALAR_FORMAT.items()}


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header: its metadata (empty unless asked for) and where its tensors are."""

    metadata: dict[str, Any]  # key -> int / float / bool / str, or a list of them for an array
    tensors: dict[str, TensorInfo]


def tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of the GGUF at ``path``, read from its header without decoding the metadata."""
    return read_header(path).tensors


def read_header(path: str | os.PathLike, *, metadata: bool = False) -> GGUFHeader:
    """The header of the GGUF at ``path``; with ``metadata``, its key/value pairs decoded too. Ours, not
    ``gguf.GGUFReader``: that builds every vocabulary string and merge as a numpy array of its own (~3 s
    and ~150 MB for a 49k-token vocabulary), where this reads them as Python strings (~0.1 s) or skips
    them. Raises ValueError for a file that is not GGUF v2/v3 or ends inside its header."""
    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            vals = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return vals[0] if len(vals) == 1 else vals

        def fits(n: int) -> int:  # a length read from a damaged file may be anything
            if n > len(m) - pos:
                raise ValueError(f"a length of {n:,} bytes at offset {pos:,} runs past the end of the file")
            return n

        def value(kind: int, keep: bool) -> Any:  # the value at pos (None unless ``keep``), pos moved past it
            nonlocal pos
            start = pos
            if kind == 8:
                n = fits(take("Q"))  # (not ``pos += fits(take(...))``: that adds to pos as it was before take)
                pos += n
                return m[start + 8:pos].decode("utf-8", errors="replace") if keep else None
            if kind in _SCALAR_SIZE:
                pos += _SCALAR_SIZE[kind]
                return struct.unpack_from("<" + _SCALAR_FORMAT[kind], m, start)[0] if keep else None
            if kind != 9:
                raise ValueError(f"unknown GGUF metadata type {kind}")
            elem, count = take("IQ")
            fits(count)  # every element takes a byte at least
            if elem not in _SCALAR_SIZE:
                items = [value(elem, keep) for _ in range(count)]
                return items if keep else None
            first = pos
            pos += fits(count * _SCALAR_SIZE[elem])
            return list(struct.unpack_from(f"<{count}{_SCALAR_FORMAT[elem]}", m, first)) if keep else None

        try:
            magic, version = take("4sI")
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
            n_tensors, n_kv = take("QQ")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = value(8, True)
                got = value(take("I"), metadata or key == "general.alignment")
                if metadata or key == "general.alignment":
                    meta[key] = got
            alignment = meta.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0:
                raise ValueError(f"general.alignment is {alignment!r}")
            raw = []
            for _ in range(n_tensors):
                name = value(8, True)
                dims = take("I")
                shape = tuple(int(x) for x in struct.unpack_from(f"<{dims}Q", m, pos))
                pos += 8 * dims
                kind, offset = take("IQ")
                raw.append((name, shape, kind, offset))
        except struct.error as e:
            raise ValueError(f"the GGUF header ends early ({e}): truncated file?") from e
        start, size = -(-pos // alignment) * alignment, len(m)
    infos = {}
    for name, shape, kind, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise UnsupportedQuantError(f"GGUF tensor {name!r} has unknown type id {kind}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        end = start + offset + math.prod(shape) // block * block_bytes
        if end > size:
            raise ValueError(f"tensor {name!r} ends at byte {end:,}, past the end of the file ({size:,} bytes): "
                             "truncated file?")
        infos[name] = TensorInfo(name, shape, qtype, start + offset)
    return GGUFHeader(meta if metadata else {}, infos)


def tensor_type(t: Any) -> str:
    """The quant type name of a ``gguf.ReaderTensor``, refused by name unless a grid reads it."""
    name = t.tensor_type.name
    if name not in GRID_OF:
        raise UnsupportedQuantError(f"GGUF tensor {t.name!r} is {name}, which agentrt cannot run "
                                    f"(supported: {', '.join(SUPPORTED)})")
    return name


def read_rows(fd: int, t: Any, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of tensor ``t`` as raw bytes [rows, bytes per row] (float types: their own dtype)."""
    import gguf

    n_cols = int(t.shape[0])  # GGUF shapes are innermost first
    block, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
    row_bytes = n_cols // block * nbytes
    buf = os.pread(fd, (stop - start) * row_bytes, t.data_offset + start * row_bytes)
    if len(buf) != (stop - start) * row_bytes:
        raise ValueError(f"GGUF tensor {t.name!r} runs past the end of the file (truncated download?)")
    return np.frombuffer(buf, dtype=np.uint8).reshape(stop - start, row_bytes)


def read_grid(fd: int, t: Any) -> Grid:
    """Tensor ``t`` (a 2-D ``gguf.ReaderTensor`` [N, K], K % 32 == 0) of the open file ``fd`` on its grid."""
    kind = tensor_type(t)
    n, k = int(t.shape[1]), int(t.shape[0])
    if k % 32:
        raise UnsupportedQuantError(f"GGUF tensor {t.name!r} has {k} inputs, not a multiple of 32")
    if kind in _EXACT:
        return _exact_grid(kind, read_rows(fd, t, 0, n), n, k)
    from gguf.quants import dequantize

    from .decode_fused import quantize_int8_groups

    q = torch.empty(n, k, dtype=torch.int8)
    d = torch.empty(n, k // 32, dtype=torch.float16)
    for a in range(0, n, _ROW_CHUNK):
        b = min(n, a + _ROW_CHUNK)
        raw = read_rows(fd, t, a, b)
        w = np.array(dequantize(raw, t.tensor_type), dtype=np.float32).reshape(b - a, k)  # a copy: F32 reads are views
        q[a:b], d[a:b] = quantize_int8_groups(torch.from_numpy(w))
    return Grid([q, d, torch.empty(0)])


def _exact_grid(kind: str, raw: np.ndarray, n: int, k: int) -> Grid:
    """Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / Q8_0 / Q5_0 blocks (raw [N, bytes per row]) as their grid, value for
    value."""
    g = k // 32
    if kind == "Q6_K":  # super-block of 256: ql[128] (low 4 bits), qh[64] (high 2), scales int8[16], d f16
        sb = raw.reshape(n, k // 256, 210)
        ql = (sb[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[:, None]) & 15
        qh = (sb[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
        # gguf.quants.Q6_K's order: half h of a super-block holds values 128h.. as ql[h] (two nibble rows of 64)
        q = ql.reshape(n, -1, 2, 128) | (qh.reshape(n, -1, 2, 128) << 4)
        return Grid([torch.from_numpy(q.reshape(n, k)), torch.from_numpy(np.ascontiguousarray(sb[..., 192:208])
                                                                        .view(np.int8).reshape(n, k // 16)),
                     torch.from_numpy(np.ascontiguousarray(sb[..., 208:]).view(np.float16).reshape(n, k // 256))])
    if kind == "Q8_0":  # block: d f16, q int8[32]
        b = raw.reshape(n, g, 34)
        q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k))
        d = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16).reshape(n, g))
        return Grid([q, d, torch.empty(0)])
    if kind == "Q5_0":  # block: d f16, the 32 high bits (u32), qs[16] as Q4_0's; w = d * (q - 16), q 0..31
        b = raw.reshape(n, g, 22)
        high = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)  # [N, G, 1]
        bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [N, G, 32]
        low = np.concatenate([b[..., 6:] & 15, b[..., 6:] >> 4], axis=-1)  # [N, G, 32]
        q = torch.from_numpy(((low | (bits << 4)).astype(np.int8) - 16).reshape(n, k))
        d = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16).reshape(n, g))
        return Grid([q, d, torch.empty(0)])
    if kind in ("Q4_0", "Q4_1"):  # block: d f16, (Q4_1: m f16), qs[16] (q[j] low nibble, q[j + 16] high)
        head = 2 if kind == "Q4_0" else 4
        b = raw.reshape(n, g, head + 16)
        packed = torch.from_numpy(np.ascontiguousarray(b[..., head:]).reshape(n, k // 2))
        d = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16).reshape(n, g)).float()
        if kind == "Q4_0":  # w = d * (q - 8): m = -8 d, exact in float32
            m = d * -8
        else:
            m = torch.from_numpy(np.ascontiguousarray(b[..., 2:4]).view(np.float16).reshape(n, g)).float()
        return Grid([packed, d, m])
    # Q4_K super-block of 256: d f16, dmin f16, 12 bytes of 6-bit scales and mins for its 8 groups, then
    # 128 bytes where 32-byte chunk c holds group 2c in its low nibbles and group 2c + 1 in its high ones.
    # Q5_K's has 32 bytes of high bits before those 128 (bit i of byte j: group i's input j)
    five = kind == "Q5_K"
    sb = raw.reshape(n, k // 256, 176 if five else 144)
    d = sb[..., 0:2].copy().view(np.float16)  # [N, S, 1]
    dmin = sb[..., 2:4].copy().view(np.float16)
    s = sb[..., 4:16].reshape(n, k // 256, 3, 4)
    lo, hi, mix = s[..., 0, :], s[..., 1, :], s[..., 2, :]  # the layout gguf.quants.Q4_K.get_scale_min unpacks
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)  # [N, S, 8] uint8
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    scales = [torch.from_numpy(sc.reshape(n, g)), torch.from_numpy(mn.reshape(n, g)),
              torch.from_numpy(d.reshape(n, -1)), torch.from_numpy(dmin.reshape(n, -1))]

    def nibbles(rows: np.ndarray) -> torch.Tensor:  # [r, S, 128] bytes -> [r, G, 32] values 0..15
        qs = torch.from_numpy(np.ascontiguousarray(rows).reshape(len(rows), k // 64, 32))
        return torch.stack([qs & 15, qs >> 4], dim=2).reshape(len(rows), g, 32)

    if five:  # a byte per weight: a row chunk at a time, so the scratch stays small beside q
        q = torch.empty(n, g, 32, dtype=torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8)[:, None]
        for a in range(0, n, _ROW_CHUNK):
            chunk = sb[a:a + _ROW_CHUNK]
            qh = torch.from_numpy(np.ascontiguousarray(chunk[..., 16:48]))  # [rows, S, 32]
            high = (qh[:, :, None, :] >> shifts) & 1  # [rows, S, 8 groups, 32]
            q[a:a + _ROW_CHUNK] = nibbles(chunk[..., 48:]) | (high.reshape(-1, g, 32) << 4)
        return Grid([q.reshape(n, k), *scales])
    groups = nibbles(sb[..., 16:])
    packed = groups[..., :16] | (groups[..., 16:] << 4)
    return Grid([packed.reshape(n, k // 2).contiguous(), *scales])
