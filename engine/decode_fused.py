"""The fused C++ decode step (``decode_kernel.cpp``): build on first use, fall back clearly.

A decode step of a small model on CPU spends most of its time in per-op dispatch and in torch's
batch-1 int8 kernels. `FusedDecoder` runs all layers of a one-token-per-sequence step in a single
C++ call over the int8 weights that `quant.Int8WeightOnlyLinear` already holds (float32 activations
and KV cache), and `FusedInt8Linear` serves the lm_head with the same GEMV.

The extension is compiled with ``torch.utils.cpp_extension`` (g++ and ninja; AVX2+FMA when the CPU
has them, scalar loops otherwise) into torch's extension cache, so only the first process pays the
build (~1 min). Where it cannot build, `load_extension` returns None and says why once.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant import Int8WeightOnlyLinear

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("decode_kernel.cpp")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, str | None]:
    if os.environ.get("AGENTRT_NO_CPP_DECODE"):
        return None, "AGENTRT_NO_CPP_DECODE is set"
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-fopenmp"]
        cpu = _cpu_flags()
        if {"avx2", "fma"} <= cpu:
            flags += ["-mavx2", "-mfma", "-mf16c"]
        tag = "avx2" if "-mavx2" in flags else "scalar"
        ext = cpp_extension.load(name=f"agentrt_decode_{tag}", sources=[str(_SOURCE)], extra_cflags=flags,
                                 extra_ldflags=["-fopenmp"], verbose=False)
        return ext, None
    except Exception as e:  # no compiler, no ninja, no headers: the torch decode path still works
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


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
    if not isinstance(q, Int8WeightOnlyLinear):
        raise ValueError(f"fused decode needs int8 weight-only linears; {what} is {type(q).__name__}")
    bias = torch.empty(0) if q.bias is None else q.bias.float().contiguous()
    return q.weight.contiguous(), q.scales.float().contiguous(), bias


class FusedInt8Linear(nn.Module):
    """An `Int8WeightOnlyLinear` run by the C++ GEMV in float32 (used for the lm_head: only the sampled
    rows reach it, so M is small)."""

    def __init__(self, lin: Int8WeightOnlyLinear, ext: Any):
        super().__init__()
        self.ext = ext
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w, s, b = _int8_parts(lin, "lm_head")
        self.register_buffer("weight", w)
        self.register_buffer("scales", s)
        self.register_buffer("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        shape = x.shape
        y = self.ext.int8_linear(x.reshape(-1, self.in_features).float(), self.weight, self.scales, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class FusedDecoder:
    """A decode step of a float32 `LlamaModel` whose decoder linears are int8 (`Int8WeightOnlyLinear`,
    possibly inside `DecodeQuantLinear`), as one C++ call. The model's modules are not changed; the
    int8 tensors are shared, not copied."""

    def __init__(self, model: nn.Module, ext: Any):
        a = model.args
        if model.embed_tokens.weight.dtype != torch.float32 or model.embed_tokens.weight.device.type != "cpu":
            raise ValueError("fused decode needs a float32 model on CPU")
        self.ext, self.model, self.args = ext, model, a
        parts: list[torch.Tensor] = []
        for i, layer in enumerate(model.layers):
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                w, s, b = _int8_parts(getattr(layer, name), f"layers.{i}.{name}")
                parts += [w, s, b] if name == "qkv_proj" else [w, s]
            parts += [layer.input_layernorm.float().contiguous(), layer.post_attention_layernorm.float().contiguous()]
        self.parts = parts  # 11 per layer, the order decode_kernel.cpp reads
        self.norm = model.norm.float().contiguous()

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, new_slots: torch.Tensor,
                 kv_slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """input_ids, positions (= earlier tokens), new_slots: [B]; kv_slots [B, Lp] (>= max position);
        k_cache/v_cache [layers, slots, nkv, hd] float32 (the new K/V are written). Returns hidden [B, H]."""
        a, m = self.args, self.model
        x = m.embed_tokens.weight.index_select(0, input_ids)  # [B, H], a fresh tensor the kernel updates
        return self.ext.decode_step(x, positions, new_slots, kv_slots, m.rope_cos, m.rope_sin, k_cache, v_cache,
                                    self.parts, self.norm, a.num_heads, a.num_kv_heads, a.head_dim, a.rms_norm_eps)


def build_fused_decoder(model: nn.Module) -> FusedDecoder | None:
    """A `FusedDecoder` for ``model`` with its lm_head swapped for a `FusedInt8Linear` when that is int8;
    None (with a logged reason) when the extension is unavailable."""
    ext = load_extension()
    if ext is None:
        return None
    dec = FusedDecoder(model, ext)
    if isinstance(model.lm_head, Int8WeightOnlyLinear):
        model.lm_head = FusedInt8Linear(model.lm_head, ext)
    return dec


@torch.inference_mode()
def fused_prompt_logits(engine: Any, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] at every position of ``token_ids``, each token run as a decode step through
    ``engine``'s fused decoder (teacher forcing: what `LLMEngine.prompt_logits` gives for the torch
    path). For tests and the accuracy bench; uses free KV blocks temporarily, no prefix cache."""
    from .config import SamplingParams

    if getattr(engine, "_fused", None) is None:
        raise ValueError("the engine has no fused decoder (EngineConfig(fused_decode=True), extension built)")
    seq = engine.make_sequence(list(token_ids), SamplingParams(max_tokens=1))
    if not engine.block_manager.can_grow(seq, len(seq.token_ids)):
        raise RuntimeError("not enough free KV blocks for fused_prompt_logits")
    engine.block_manager.grow(seq, len(seq.token_ids))
    rows = []
    try:
        while seq.num_uncomputed:
            ids, pos, new_slots, kv_slots, _, _ = engine._prepare_graph([(seq, 1)])
            hidden = engine._fused(ids, pos, new_slots, kv_slots, engine.kv.k, engine.kv.v)  # [1, H]
            rows.append(engine.model.compute_logits(hidden))
            seq.num_computed_tokens += 1
    finally:
        engine.block_manager.free(seq)
    return torch.cat(rows)
