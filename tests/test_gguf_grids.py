"""GGUF tensors read straight onto the fused step's grids: exact where the grid holds the type, within
half an int8 step where it is rounded; unsupported and truncated files are refused by name."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package reads GGUF files")
from gguf.quants import dequantize, quantize  # noqa: E402

from agentrt.engine.gguf_grids import Grid, UnsupportedQuantError, read_grid  # noqa: E402

N, K = 40, 512  # 40 rows: whole blocks of 8 plus none short; K spans two K-quant super-blocks
# (values per block, bytes per block, [(offset, fp16 scale)]): random bytes with small scales are valid blocks
_RANDOM_BLOCKS = {"Q4_K": (256, 144, [(0, 1e-3), (2, 1e-3)]), "Q5_K": (256, 176, [(0, 1e-3), (2, 1e-3)]),
                  "Q6_K": (256, 210, [(208, 1e-4)])}


def _blocks(qtype: str, rng: np.random.Generator) -> np.ndarray:
    t = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype in _RANDOM_BLOCKS:
        per, nbytes, scales = _RANDOM_BLOCKS[qtype]
        raw = rng.integers(0, 256, size=(N, K // per, nbytes), dtype=np.uint8)
        for off, v in scales:
            raw[..., off:off + 2] = np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)
        return raw.reshape(N, -1)
    w = rng.standard_normal((N, K)).astype(np.float32)
    if qtype == "F32":
        return w
    if qtype == "F16":
        return w.astype(np.float16)
    return quantize(w, t)


def _file(tmp_path, qtypes: list[str]) -> gguf.GGUFReader:
    rng = np.random.default_rng(0)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for q in qtypes:
        data = _blocks(q, rng)
        raw = None if q in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, q)
        w.add_tensor(q, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


def _read(tmp_path, qtypes: list[str]) -> list[tuple[Grid, torch.Tensor]]:
    """(grid, what gguf.quants.dequantize gives) for a tensor of each type, read back from a file."""
    reader = _file(tmp_path, qtypes)
    fd = os.open(reader.data.filename, os.O_RDONLY)
    try:
        return [(read_grid(fd, t), torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
                                                    .reshape(N, K))) for t in reader.tensors]
    finally:
        os.close(fd)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0"])
def test_exact_types_round_trip_bit_for_bit(tmp_path, ext, qtype):
    """Each exact type's grid is the file's values, and so are the rows read back from its packed form."""
    from agentrt.engine.decode_fused import FusedLinear

    ((grid, want),) = _read(tmp_path, [qtype])
    assert grid.kind == {"Q8_0": "int8", "Q5_0": "int8", "Q5_K": "int5", "Q6_K": "int6"}.get(qtype, "int4")
    assert torch.equal(grid.dequantize(), want)
    packed = FusedLinear(grid.parts, torch.empty(0), K, ext)
    assert torch.equal(packed.rows(torch.tensor([0, 7, 39, 8])), want[[0, 7, 39, 8]])


def test_q4_k_keeps_its_super_blocks_in_the_kernel(tmp_path, ext):
    """Q4_K runs on its own scales (4.625 bits a weight, not 6): the kernel's results equal those of the same
    grid with float32 scales per group bit for bit (whole blocks of 8 rows and a short one), and the packed
    rows read back the grid."""
    from agentrt.engine.decode_fused import FusedLinear

    ((grid, want),) = _read(tmp_path, ["Q4_K"])
    assert grid.super_blocks and grid.kind == "int4"
    for rows in (N, 21):
        part = Grid([p[:rows] for p in grid.parts])
        sup = FusedLinear(part.parts, torch.empty(0), K, ext)
        flat = FusedLinear(part.to_group_scales().parts, torch.empty(0), K, ext)
        assert sup.scales.dtype == torch.uint8 and sup.scales.numel() == rows * K // 256 * 20
        assert torch.equal(sup.rows(torch.arange(rows)), want[:rows])
        for m in (1, 3, 12):
            x = torch.randn(m, K)
            for int16 in (False, True):
                sup.int16 = flat.int16 = int16
                assert torch.equal(sup(x), flat(x)), (rows, m, int16)
    with pytest.raises(RuntimeError, match="super-block scales need"):
        ext.linear(torch.randn(1, K), sup.weight, sup.scales[:, :-1].contiguous(), sup.zeros, torch.empty(0), False)


@pytest.mark.parametrize("qtype,bits", [("Q5_K", 5.625), ("Q6_K", 6.5625)])
def test_k_quants_run_on_their_own_grid_within_activation_rounding(tmp_path, ext, qtype, bits):
    """Q5_K runs as int5 and Q6_K as int6 (5.625 and 6.5625 bits a weight; int8 took 8.5): every output is
    within the rounding of the activations to int8 (int16-like with ``int16``) of the float product with the
    file's weights, for whole blocks of 8 rows and a short one, one row and many (the unpacked path)."""
    from agentrt.engine.decode_fused import FusedLinear

    ((grid, want),) = _read(tmp_path, [qtype])
    for rows in (N, 21):
        lin = FusedLinear(Grid([p[:rows] for p in grid.parts]).parts, torch.empty(0), K, ext)
        assert lin.weight.numel() + lin.scales.numel() == rows * K * bits / 8
        w = want[:rows].double()
        for m in (1, 3, 12):
            x = torch.randn(m, K)
            for int16 in (False, True):
                lin.int16 = int16
                step = x.abs().reshape(m, K // 32, 32).amax(-1).double() / 127 / (508 if int16 else 2)
                bound = step @ w.abs().reshape(rows, K // 32, 32).sum(-1).T
                assert ((lin(x).double() - x.double() @ w.T).abs() <= bound * 1.001 + 1e-6).all(), (rows, m, int16)
    with pytest.raises(RuntimeError, match=f"{grid.kind} .{qtype}. needs|super-block scales need"):
        ext.linear(torch.randn(1, K), lin.weight, lin.scales[:, :-1].contiguous(), lin.zeros, torch.empty(0), False)


@pytest.mark.parametrize("qtype", ["Q5_1", "F16", "F32"])
def test_other_types_are_rounded_onto_int8_within_half_a_step(tmp_path, qtype):
    ((grid, want),) = _read(tmp_path, [qtype])
    step = want.reshape(N, K // 32, 32).abs().amax(-1) / 127  # [N, G]
    err = (grid.dequantize() - want).abs().reshape(N, K // 32, 32).amax(-1)
    assert grid.kind == "int8"
    # half a step, plus the float16 rounding of the step itself across 127 levels
    assert (err <= step * (0.5 + 127 / 2048) + 1e-12).all()


def test_mixed_grids_stack_on_int8(tmp_path):
    (q4, _), (q6, _) = _read(tmp_path, ["Q4_K", "Q6_K"])
    both = Grid.cat([q4, q6])
    assert both.kind == "int8" and both.rows == 2 * N
    step = q4.dequantize().reshape(N, K // 32, 32).abs().amax(-1) / 127
    err = (both.dequantize()[:N] - q4.dequantize()).abs().reshape(N, K // 32, 32).amax(-1)
    assert (err <= step * (0.5 + 127 / 2048) + 1e-12).all()
    assert torch.equal(Grid.cat([q4, q4]).parts[0], torch.cat([q4.parts[0]] * 2))


def test_unsupported_type_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", rng.integers(0, 256, (8, 66), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = gguf.GGUFReader(str(path)).tensors[0]
    with pytest.raises(UnsupportedQuantError, match=r"IQ2_XXS.*supported: .*Q4_K.*Q6_K"):
        read_grid(-1, t)


def test_truncated_tensor_is_a_clear_error(tmp_path):
    reader = _file(tmp_path, ["Q4_1"])
    t = reader.tensors[0]
    path = reader.data.filename
    size = os.path.getsize(path)
    del reader
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="past the end of the file"):
            read_grid(fd, t)
    finally:
        os.close(fd)


def test_the_header_reader_decodes_what_gguf_does_and_refuses_damage(tmp_path):
    from agentrt.engine.gguf_grids import read_header
    from agentrt.engine.loader import embedded_model_path

    path = embedded_model_path()
    ours, reader = read_header(path, metadata=True), gguf.GGUFReader(str(path))
    assert {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")} == ours.metadata
    assert [(t.name, tuple(int(x) for x in t.shape), t.tensor_type, int(t.data_offset)) for t in reader.tensors] == \
        [(t.name, t.shape, t.tensor_type, t.data_offset) for t in ours.tensors.values()]
    assert read_header(path).tensors == ours.tensors and read_header(path).metadata == {}

    def header(*kv: bytes) -> Path:
        out = tmp_path / "damaged.gguf"
        out.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv) + bytes(64))
        return out

    key = struct.pack("<Q", 3) + b"abc"
    for damaged in (struct.pack("<Q", 1 << 60),  # a key as long as no file is
                    key + struct.pack("<IIQ", 9, 8, 1 << 60),  # an array of 2**60 strings
                    key + struct.pack("<IIQ", 9, 6, 1 << 40)):  # of 2**40 floats
        with pytest.raises(ValueError, match="past the end of the file"):
            read_header(header(damaged), metadata=True)
    assert read_header(header(key + struct.pack("<IQ", 8, 2) + b"hi"), metadata=True).metadata == {"abc": "hi"}
