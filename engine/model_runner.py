"""`ModelRunner`: the model, its KV cache and the step backends. The engine hands it scheduled
entries; it prepares one `StepInputs`, runs the first backend that supports them and returns
hidden states and logits. Knows nothing of requests' text, sampling or scheduling."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .config import EngineConfig
from .kv_cache import KVCache
from .model import DecodeQuantLinear, LlamaModel
from .quant import Int8WeightOnlyLinear
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
        self.fused: FusedBackend | None = None
        self.weights_read = f"{config.quantization} weights" if config.quantization else ""
        build = self._build_from_gguf if _reads_gguf_grids(config, loaded) else self._build_from_weights
        self.model, decoder = build(loaded, max_model_len)
        a = self.model.args
        kv_dtype = self._kv_dtype(fused_everywhere=decoder is not None and not config.prefill_int8)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            per_token = KVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, kv_dtype)
            if config.kv_cache_gb is not None:  # the user's budget, even below one max_model_len sequence
                budget_tokens = max(config.block_size, int(config.kv_cache_gb * 1e9) // per_token)
            else:
                budget_tokens = max(max_model_len, min(_KV_BUDGET_BYTES // per_token,
                                                       config.max_num_seqs * max_model_len))
            num_blocks = -(-budget_tokens // config.block_size)
        self.kv = KVCache(a.num_layers, num_blocks, config.block_size, a.num_kv_heads, a.head_dim, kv_dtype,
                          self.device)
        self.eager = EagerBackend(self.model, self.kv, config.block_size)
        self.compiled = CompiledDecodeBackend(self.model, self.kv, config.block_size) if config.compile else None
        if decoder is not None:
            # with prefill_int8 the W8A8 prefill linears are torch's: the C++ step runs decode-only steps
            self.fused = FusedBackend(decoder, self.kv, config.block_size, prefill=not config.prefill_int8)
        self.backends: list[StepBackend] = [b for b in (self.fused, self.compiled, self.eager) if b is not None]
        if self.fused is not None and self.fused.prefill:
            self.backends = [self.fused]  # it runs every step: the layers hold no weights of their own
        self._kernel_threads = config.num_threads or torch.get_num_threads()  # the fused kernels' pool

    # ---- threads -----------------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        """Threads a step computes on: the fused kernels' pool, or torch's intra-op threads."""
        return self._kernel_threads if self.fused is not None else torch.get_num_threads()

    def set_threads(self, n: int) -> None:
        """Set `threads` (from the next step on)."""
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        if self.fused is not None:
            self._kernel_threads = n
        if self.fused is None or not self.fused.prefill:  # torch computes steps (or their prefill chunks)
            torch.set_num_threads(n)

    @contextmanager
    def threads_for_step(self) -> Iterator[None]:
        """Around one engine step. With the fused step, its kernels run on their own pool with `threads`
        threads; where it runs every step, torch's ops around it (embedding rows, sampling, grammar masks) run
        on the calling thread alone: they are small, and each parallel region of torch's leaves libgomp's
        workers spinning for milliseconds on the cores the kernels' pool needs next (with 8 requests, a
        decode step of SmolLM2-135M on 2 cores took 1.6x as long that way). With ``prefill_int8`` torch's
        W8A8 linears compute the prefill chunks, on torch's threads."""
        if self.fused is None:
            yield
            return
        ext = self.fused.decoder.ext
        kernels_before, torch_before = ext.set_num_threads(self._kernel_threads), torch.get_num_threads()
        if self.fused.prefill:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(torch_before)
            ext.set_num_threads(kernels_before)

    def _kv_dtype(self, fused_everywhere: bool) -> torch.dtype:
        """The KV pool's dtype: float16 where the C++ step runs every step (it widens what it reads), unless
        the config pins float32; elsewhere the model's dtype, which the torch path's attention reads."""
        choice = self.config.kv_cache_dtype
        if fused_everywhere:
            return torch.float32 if choice == "float32" else torch.float16
        if choice != "auto":
            raise ValueError(f"kv_cache_dtype={choice!r} needs the fused C++ step running every step; this "
                             f"engine runs steps on the torch path ({self.dtype}): leave kv_cache_dtype='auto'")
        return self.dtype

    def _build_from_gguf(self, loaded: Any, max_model_len: int) -> tuple[LlamaModel, Any]:
        """(model, C++ step) on the GGUF's own grids, read from the file tensor by tensor."""
        from .decode_fused import load_extension
        from .fused_model import build_from_gguf
        from .loader import gguf_rows_interleaved

        self.weights_read = f"{loaded.quant_type} weights read onto int4/int5/int6/int8 grids"
        return build_from_gguf(loaded.gguf_path, loaded.config, gguf_rows_interleaved(loaded.config), load_extension(),
                               self.config.fused_activations, max_model_len, loaded.cache_dir)

    def _build_from_weights(self, loaded: Any, max_model_len: int) -> tuple[LlamaModel, Any]:
        """(model, C++ step or None) from float weights, quantized as the config says. With the C++ step
        running every step, each weight is quantized and packed as it is read (no float copy of the
        layers exists); with it running decode only, it is packed from the built model (None when the
        extension cannot build: the torch path runs)."""
        config = self.config
        if config.fused_decode and not config.prefill_int8 and _extension_builds():
            from .decode_fused import load_extension
            from .fused_model import build_from_float

            return build_from_float(loaded.weights, loaded.config, config.quantization, load_extension(),
                                    config.fused_activations, max_model_len)
        model = LlamaModel.from_weights(loaded.config, loaded.weights, self.dtype, self.device, max_len=max_model_len)
        if config.quantization is not None:
            calibration = None
            if config.prefill_int8:
                from .dynamic_int8 import CALIBRATION_TEXT

                calibration = list(loaded.tokenizer(CALIBRATION_TEXT).input_ids)[:max_model_len]
            quantize_model(model, config.quantization, self.device, calibration)
        decoder = None
        if config.fused_decode:
            from .decode_fused import build_fused_decoder

            decoder = build_fused_decoder(model, config.quantization, config.fused_activations)
        return model, decoder

    def describe(self) -> str:
        """Which path runs the steps and the memory it holds, e.g. "fused C++ step, int4 weights, avx2
        kernels, float32, 2 threads, weights 198 MB, KV pool 1074 MB float16 (touched as used)"."""
        c = self.config
        if self.fused is not None:
            from .decode_fused import kernel_isa

            head = f"fused C++ step, {self.weights_read}, {kernel_isa()} kernels"
        else:
            head = "torch" + (f", {c.quantization} weights" if c.quantization else "") + (", compiled" if c.compile else "")
        kv_dtype = str(self.kv.k.dtype).removeprefix("torch.")
        return (f"{head}, {str(self.dtype).removeprefix('torch.')}, {self.threads} threads, "
                f"weights {self.weight_bytes() / 1e6:.0f} MB, KV pool {2 * self.kv.k.nbytes / 1e6:.0f} MB "
                f"{kv_dtype} (touched as used)")

    def weight_bytes(self) -> int:
        """Bytes of every weight the engine holds (the C++ step's packed copies included)."""
        tensors = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        if self.fused is not None:
            tensors.update({id(t): t for t in self.fused.decoder.parts})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @staticmethod
    def prepare(entries: list[tuple[Sequence, int]]) -> StepInputs:
        return StepInputs.from_entries(entries)

    def execute(self, inputs: StepInputs, all_rows: bool = False) -> torch.Tensor:
        """Run a step: the sample rows' final hidden states [N, H] (``all_rows``: every row's)."""
        backend = next(b for b in self.backends if b.supports(inputs))
        return backend.run(inputs, all_rows)

    @torch.inference_mode()
    def prompt_logits(self, seq: Sequence, chunk_sizes: list[int]) -> torch.Tensor:
        """Logits [T, vocab] at every position of ``seq`` (its blocks allocated by the caller), run
        in chunks of ``chunk_sizes`` (the last size repeating) through the backend a step of that
        shape takes (with quantization, torch-path chunks of <= 16 rows run the quantized decode
        kernels, larger ones the dense weights)."""
        rows = []
        while seq.num_uncomputed:
            n = min(seq.num_uncomputed, chunk_sizes[min(len(rows), len(chunk_sizes) - 1)])
            hidden = self.execute(self.prepare([(seq, n)]), all_rows=True)  # [n, H]
            rows.append(self.compute_logits(hidden))
            seq.num_computed_tokens += n
        return torch.cat(rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab]."""
        return self.model.compute_logits(hidden)

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: the quantized copies when quantized (not the dense
        prefill copies; the C++ step's packed ones when it runs), the lm_head, not the embedding table
        (one row per token) nor RoPE tables. Divided by the memory bandwidth, this is the floor of
        decode time per step."""
        model = self.model
        seen: set[int] = set()
        total = 0
        if self.fused is not None:
            total += sum(t.numel() * t.element_size() for t in self.fused.decoder.parts)

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

        if self.fused is None:
            for layer in model.layers:
                walk(layer)
        walk(model.lm_head)
        return total + model.norm.numel() * model.norm.element_size()


def _reads_gguf_grids(config: EngineConfig, loaded: Any) -> bool:
    """Whether the C++ step runs a GGUF on the file's own grids: fused everything, on the bit width
    `EngineConfig.resolved` picks for the file's quant type (another one asked for is quantized from
    the float weights)."""
    from .config import gguf_fused_mode

    return (getattr(loaded, "gguf_path", None) is not None and config.fused_decode and not config.prefill_int8
            and config.quantization == gguf_fused_mode(loaded.quant_type) and _extension_builds())


def _extension_builds() -> bool:
    from .decode_fused import load_extension

    return load_extension() is not None


def quantize_model(model: LlamaModel, mode: str, device: torch.device, calibration_ids: list[int] | None) -> None:
    """Weight-only quantize the decoder linears (``mode``) and the lm_head (int8), in place.

    On CPU the dense weights are kept for prefill chunks (see `DecodeQuantLinear`): decode reads
    the small quantized weights, prefill keeps the dense matmul's speed; with ``calibration_ids``
    (prefill_int8) the prefill copies are dynamic int8 (W8A8) linears, SmoothQuant-calibrated on
    them. On CUDA the torch kernels used do not apply: refuse clearly."""
    from .quant import quantize_

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
