"""`ModelRunner`: the model, its KV cache and the step backends. The engine hands it scheduled
entries; it prepares one `StepInputs`, runs the first backend that supports them and returns
hidden states and logits. Knows nothing of requests' text, sampling or scheduling."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import EngineConfig
from .kv_cache import KVCache
from .model import DecodeQuantLinear, LlamaModel
from .sequence import Sequence
from .step_backends import CompiledDecodeBackend, EagerBackend, FusedBackend, StepBackend, StepInputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Default KV pool budget when num_kv_blocks is None (at least one max_model_len sequence).
_KV_BUDGET_BYTES = 1 << 30


class ModelRunner:
    """Builds the model from ``loaded`` (an `engine.loader.LoadedModel`), quantizes it as
    ``config`` says, sizes the KV pool, and runs steps through its backends (tried in order:
    fused C++, compiled decode, torch eager; eager runs anything)."""

    def __init__(self, config: EngineConfig, loaded: Any, max_model_len: int):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.resolved_dtype()]
        self.model = LlamaModel.from_weights(loaded.config, loaded.weights, self.dtype, self.device,
                                             max_len=max_model_len)
        if config.quantization is not None:
            calibration = None
            if config.prefill_int8:
                from .dynamic_int8 import CALIBRATION_TEXT

                calibration = list(loaded.tokenizer(CALIBRATION_TEXT).input_ids)[:max_model_len]
            quantize_model(self.model, config.quantization, self.device, calibration)
        a = self.model.args
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            per_token = KVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, self.dtype)
            budget_tokens = max(max_model_len, min(_KV_BUDGET_BYTES // per_token,
                                                   config.max_num_seqs * max_model_len))
            num_blocks = -(-budget_tokens // config.block_size)
        self.kv = KVCache(a.num_layers, num_blocks, config.block_size, a.num_kv_heads, a.head_dim, self.dtype,
                          self.device)
        self.eager = EagerBackend(self.model, self.kv, config.block_size)
        self.compiled = CompiledDecodeBackend(self.model, self.kv, config.block_size) if config.compile else None
        self.fused = None
        if config.fused_decode:  # None when the extension cannot build: the torch path runs
            from .decode_fused import build_fused_decoder

            decoder = build_fused_decoder(self.model, config.quantization, config.fused_activations)
            if decoder is not None:
                # with prefill_int8 the W8A8 prefill linears are torch's: the C++ step runs decode-only steps
                self.fused = FusedBackend(decoder, self.kv, config.block_size, prefill=not config.prefill_int8)
        self.backends: list[StepBackend] = [b for b in (self.fused, self.compiled, self.eager) if b is not None]

    @staticmethod
    def prepare(entries: list[tuple[Sequence, int]]) -> StepInputs:
        return StepInputs.from_entries(entries)

    def execute(self, inputs: StepInputs, all_rows: bool = False) -> torch.Tensor:
        """Run a step: the sample rows' final hidden states [N, H] (``all_rows``: every row's)."""
        backend = next(b for b in self.backends if b.supports(inputs))
        return backend.run(inputs, all_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab]."""
        return self.model.compute_logits(hidden)

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: the quantized copies when quantized (not the dense
        prefill copies), the lm_head, not the embedding table (one row per token) nor RoPE tables.
        Divided by the memory bandwidth, this is the floor of decode time per step."""
        model = self.model
        seen: set[int] = set()
        total = 0

        def walk(mod: nn.Module) -> None:
            nonlocal total
            if isinstance(mod, DecodeQuantLinear):
                walk(mod.quantized)
                return
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            for child in mod.children():
                if child is not model.embed_tokens:
                    walk(child)

        for layer in model.layers:
            walk(layer)
        walk(model.lm_head)
        return total + model.norm.numel() * model.norm.element_size()


def quantize_model(model: LlamaModel, mode: str, device: torch.device, calibration_ids: list[int] | None) -> None:
    """Weight-only quantize the decoder linears (``mode``) and the lm_head (int8), in place.

    On CPU the dense weights are kept for prefill chunks (see `DecodeQuantLinear`): decode reads
    the small quantized weights, prefill keeps the dense matmul's speed; with ``calibration_ids``
    (prefill_int8) the prefill copies are dynamic int8 (W8A8) linears, SmoothQuant-calibrated on
    them. On CUDA the torch kernels used do not apply: refuse clearly."""
    from .quant import Int8WeightOnlyLinear, quantize_

    if device.type != "cpu":
        raise ValueError(f"quantization={mode!r} uses torch's CPU kernels; use quantization=None on {device}")
    layers = model.layers
    dense = {name: mod for name, mod in layers.named_modules() if isinstance(mod, nn.Linear)}
    if calibration_ids is not None:
        from .dynamic_int8 import DynamicInt8Linear, calibrate_llama

        absmax = calibrate_llama(model, calibration_ids)
        dense = {name: DynamicInt8Linear(lin.weight, lin.bias, act_absmax=absmax[name]) for name, lin in dense.items()}
    quantize_(layers, mode)  # replaces every nn.Linear under layers in place
    for name, lin in dense.items():
        parent_name, _, attr = name.rpartition(".")
        parent = layers.get_submodule(parent_name)
        setattr(parent, attr, DecodeQuantLinear(lin, getattr(parent, attr)))
    # the lm_head is a fifth of the weight bytes of a small model: int8 per-row keeps its logits close;
    # it only ever sees the rows being sampled, so no dense copy is needed
    model.lm_head = Int8WeightOnlyLinear(model.lm_head.weight, None)
