"""The fused engine built straight from a checkpoint, one tensor at a time, so loading never holds a
float32 copy of the model: peak memory is the packed model plus one tensor's scratch.

* A GGUF (`pack_gguf`): each weight is read from the file onto its grid (`gguf_grids`) and packed into
  the C++ step's order. The packed tensors are cached beside the GGUF's header
  (``packed-<code hash>.pt``) and memory-mapped by the next load: its pages are the file's, as
  llama.cpp's are.
* Float weights (`pack_float`, an HF folder with ``quantization`` int8 / int4 and ``fused_decode``):
  each weight is read from the checkpoint and quantized (int8 rows, or int4 groups of 32 on the Q4_1
  grid) as the torch-built engine would, so the numbers are the same; the token embedding stays float32.

q/k rows need no reordering for llama and mistral GGUFs: llama.cpp's permuted order is the engine's
interleaved RoPE order (`model._interleave_heads`); qwen2 GGUFs and HF checkpoints keep HF's order and
are interleaved here.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decode_fused import NO_LINEAR, FusedDecoder, FusedLinear, PackedEmbedding, lm_head_linear, weight_parts
from .gguf_grids import Grid, read_grid, read_rows, tensor_infos
from .heap import trim_heap
from .model import LlamaModel, ModelArgs, _interleave_heads
from .quant import Int8WeightOnlyLinear

log = logging.getLogger(__name__)
# the code that decides the packed bytes: a change to any of it makes a new cache entry
_PACKING_CODE = [Path(__file__).with_name(f) for f in ("fused_model.py", "gguf_grids.py", "decode_fused.py",
                                                      "kernels.h")]


@dataclass
class PackedGGUF:
    """A GGUF's weights in the C++ step's order: ``layers`` 18 tensors per layer (`decode_fused.layer_parts`
    order), the token embedding and (untied) output as packed [w, s, z], the final norm."""

    layers: list[torch.Tensor]
    embedding: list[torch.Tensor]
    output: list[torch.Tensor] | None
    output_norm: torch.Tensor


def build_from_float(weights: Mapping[str, torch.Tensor], config: dict[str, Any], mode: str, ext: Any,
                     activations: str = "int8", max_len: int | None = None) -> tuple[LlamaModel, FusedDecoder]:
    """(model, decoder) for HF-named float ``weights`` (read one tensor at a time) on the ``mode`` grid
    ("int8" rows or "int4" groups): the float32 embedding, the lm_head as `decode_fused.fused_lm_head`
    makes it (int8 groups of the tied embedding, else int8 rows)."""
    args = ModelArgs.from_config(config)
    embed = torch.nn.Embedding(args.vocab_size, args.hidden_size, _weight=weights["model.embed_tokens.weight"],
                               _freeze=True)
    untied = None if args.tie_word_embeddings else Int8WeightOnlyLinear(weights["lm_head.weight"], None)
    head = lm_head_linear(args, embed.weight, untied, ext, activations == "int16")
    return _assemble(config, pack_float(weights, args, mode), embed, head, weights["model.norm.weight"], ext,
                     activations, max_len)


def _assemble(config: dict[str, Any], layers: list[torch.Tensor], embed: torch.nn.Module, head: torch.nn.Module,
              norm: torch.Tensor, ext: Any, activations: str, max_len: int | None) -> tuple[LlamaModel, FusedDecoder]:
    """The norms-only model around packed ``layers`` (18 per layer) and the C++ step that runs them."""
    norms = [(layers[18 * i + 16], layers[18 * i + 17]) for i in range(len(layers) // 18)]
    model = LlamaModel.for_fused_step(config, embed, head, norm, norms, max_len)
    return model, FusedDecoder(model, ext, layers, activations)


def pack_float(weights: Mapping[str, torch.Tensor], args: ModelArgs, mode: str) -> list[torch.Tensor]:
    """The C++ step's 18 tensors per layer from HF-named float weights, each quantized as it is read."""

    def lin(*names: str, rope: int = 0) -> list[torch.Tensor]:  # the first ``rope`` weights are q/k
        return weight_parts([_interleave_heads(weights[n], args.head_dim) if j < rope else weights[n]
                             for j, n in enumerate(names)], mode)

    layers: list[torch.Tensor] = []
    for i in range(args.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        layers += lin(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight", rope=2)
        layers.append(torch.cat([_interleave_heads(weights[a + "q_proj.bias"], args.head_dim),
                                 _interleave_heads(weights[a + "k_proj.bias"], args.head_dim),
                                 weights[a + "v_proj.bias"]]) if args.attention_bias else torch.empty(0))
        layers += NO_LINEAR
        layers += lin(a + "o_proj.weight")
        layers += lin(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        layers += lin(p + "mlp.down_proj.weight")
        layers += [weights[p + "input_layernorm.weight"].contiguous(),
                   weights[p + "post_attention_layernorm.weight"].contiguous()]
    return layers


def build_from_gguf(path: str, config: dict[str, Any], interleaved: bool, ext: Any, activations: str = "int8",
                    max_len: int | None = None, cache_dir: str | None = None) -> tuple[LlamaModel, FusedDecoder]:
    """(model, decoder) for the GGUF at ``path`` whose converted ``config`` the loader made; ``interleaved``:
    the file's q/k rows are already in RoPE pair order (`loader.gguf_rows_interleaved`). With ``cache_dir``
    (the GGUF's header folder) the packed weights are cached there and mapped from there next time."""
    packed = _cached(Path(cache_dir)) if cache_dir else None
    if packed is None:
        packed = pack_gguf(path, config, interleaved)
        if cache_dir:
            _save(packed, Path(cache_dir))
    args = ModelArgs.from_config(config)
    int16 = activations == "int16"
    embedding = FusedLinear(packed.embedding, torch.empty(0), args.hidden_size, ext, int16, packed=True)
    # a tied lm_head multiplies by the embedding's own packed copy
    head = embedding if packed.output is None else FusedLinear(packed.output, torch.empty(0), args.hidden_size, ext,
                                                               int16, packed=True)
    return _assemble(config, packed.layers, PackedEmbedding(embedding), head, packed.output_norm, ext, activations,
                     max_len)


def pack_gguf(path: str, config: dict[str, Any], interleaved: bool) -> PackedGGUF:
    """Read and pack every weight of the GGUF at ``path``, one tensor at a time."""
    tensors = tensor_infos(path)  # the header; the data is read with pread
    args = ModelArgs.from_config(config)
    fd = os.open(path, os.O_RDONLY)
    try:
        def tensor(name: str) -> Any:
            if name not in tensors:
                raise ValueError(f"{os.path.basename(path)}: GGUF tensor {name!r} is missing")
            return tensors[name]

        def grid(name: str) -> Grid:
            return read_grid(fd, tensor(name))

        def vector(name: str) -> torch.Tensor:
            from gguf.quants import dequantize

            t = tensor(name)
            return torch.from_numpy(np.array(dequantize(read_rows(fd, t, 0, 1), t.tensor_type), dtype=np.float32)
                                    .reshape(-1))

        def rope_order(g: Grid) -> Grid:
            if interleaved:
                return g
            perm = _interleave_heads(torch.arange(g.rows), args.head_dim)
            return Grid([p[perm] if p.numel() else p for p in g.parts])

        def rope_bias(b: torch.Tensor) -> torch.Tensor:
            return b if interleaved else _interleave_heads(b, args.head_dim)

        layers: list[torch.Tensor] = []
        for i in range(args.num_layers):
            p = f"blk.{i}."
            qk = Grid.cat([rope_order(grid(p + "attn_q.weight")), rope_order(grid(p + "attn_k.weight"))])
            v = grid(p + "attn_v.weight")
            apart = (v.kind, v.super_blocks) != (qk.kind, qk.super_blocks)  # v runs on its own grid
            layers += FusedLinear.pack((qk if apart else Grid.cat([qk, v])).parts, args.hidden_size)
            layers.append(torch.cat([rope_bias(vector(p + "attn_q.bias")), rope_bias(vector(p + "attn_k.bias")),
                                     vector(p + "attn_v.bias")]) if args.attention_bias else torch.empty(0))
            layers += FusedLinear.pack(v.parts, args.hidden_size) if apart else NO_LINEAR
            layers += FusedLinear.pack(grid(p + "attn_output.weight").parts, args.num_heads * args.head_dim)
            layers += FusedLinear.pack(Grid.cat([grid(p + "ffn_gate.weight"), grid(p + "ffn_up.weight")]).parts,
                                       args.hidden_size)
            layers += FusedLinear.pack(grid(p + "ffn_down.weight").parts, args.intermediate_size)
            layers += [vector(p + "attn_norm.weight"), vector(p + "ffn_norm.weight")]
            trim_heap()  # the layer's scratch, before the next layer's packed tensors land above it
        embedding = FusedLinear.pack(grid("token_embd.weight").parts, args.hidden_size)
        trim_heap()
        output = None if args.tie_word_embeddings else FusedLinear.pack(grid("output.weight").parts, args.hidden_size)
        trim_heap()
        return PackedGGUF(layers, embedding, output, vector("output_norm.weight"))
    finally:
        os.close(fd)


def _cache_file(folder: Path) -> Path:
    code = hashlib.sha256(b"".join(p.read_bytes() for p in _PACKING_CODE)).hexdigest()[:12]
    return folder / f"packed-{code}.pt"


def _cached(folder: Path) -> PackedGGUF | None:
    file = _cache_file(folder)
    if not file.is_file():
        return None
    try:
        # memory-mapped: the weights' pages are the cache file's, read in as the steps touch them
        return PackedGGUF(**torch.load(file, mmap=True, weights_only=True))
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt from the GGUF
        log.warning("packed-weights cache %s is unreadable (%s); repacking from the GGUF", file, e)
        return None


def _save(packed: PackedGGUF, folder: Path) -> None:
    """Write the cache entry whole or not at all, and drop entries of older packing code."""
    file = _cache_file(folder)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        torch.save(vars(packed), tmp)
        tmp.replace(file)
    except OSError as e:  # a read-only or full cache only costs the next load its repacking
        log.warning("could not cache the packed weights in %s (%s)", folder, e)
    finally:
        tmp.unlink(missing_ok=True)
    for old in folder.glob("packed-*.pt"):
        if old != file:
            old.unlink(missing_ok=True)
