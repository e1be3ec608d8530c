"""Configuration of the engine and of one request's sampling."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANT = (None, "auto", "int8", "int4")
# a GGUF's linears run on the fused step's int4 grid (groups of 32, Q4_1-like) when they are 4-bit, on its int8
# grid (groups of 32, Q8_0) when they have more bits: requantizing 5/6/8-bit weights to 4 bits would lose accuracy
_GGUF_FUSED_MODE = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "IQ4_NL": "int4", "IQ4_XS": "int4",
                    "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "Q8_0": "int8", "Q8_K": "int8"}


def gguf_fused_mode(quant_type: str | None) -> str | None:
    """The fused step's bit width ("int4" / "int8") for a GGUF whose linears are ``quant_type``."""
    return _GGUF_FUSED_MODE.get(quant_type or "")


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class EngineConfig:
    """How to build and run an `LLMEngine`.

    model: None = the embedded SmolLM2-135M-Instruct, else an HF folder, a .safetensors or a .gguf path.
    num_kv_blocks: KV pool size in blocks of ``block_size`` tokens; None = sized from ``kv_cache_gb``.
    kv_cache_gb: the KV pool's memory when ``num_kv_blocks`` is None; None = 1 GiB, at least one full
      ``max_model_len`` sequence and at most ``max_num_seqs`` of them. Pages are touched only as used.
    kv_cache_dtype: what the KV pool stores. "auto" = float16 where the fused C++ step runs every step
      (as llama.cpp does by default: half the memory, so twice the tokens in ``kv_cache_gb``, and half
      the bytes a decode step reads of a long context; K and V are rounded to float16 once, as they
      are stored, and every product and sum stays float32), else the model's dtype. "float16" and
      "float32" choose for the C++ step; the torch path refuses them (it keeps the model's dtype).
    max_num_batched_tokens: the most tokens one step computes (so a long prompt is prefilled in chunks
      of at most this many tokens while other requests keep decoding).
    max_model_len: context window; None = the model's ``max_position_embeddings`` (capped at 8192).
    kv_pin_ttl_s: how long a finished request with a cache key (an agent run's id) keeps its KV pinned
      for the key's next request (a run's next step, after its tools); 0 = never pinned. Pins are
      released first when the pool runs short, so they never refuse or stall a request.
    dtype: "auto" = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else float32
      (without native bf16 the CPU matmuls run several times slower in bf16 than in fp32).
    quantization: weight-only int8/int4 for the decoder layers' linears (the lm_head gets int8). "auto"
      (the default): a quantized GGUF runs on its own bit width in the fused C++ step (``fused_decode``,
      float32 activations) when ``dtype`` is "auto" and the device is the CPU; float checkpoints, a
      pinned dtype or another device run unquantized (see `resolved`).
    prefill_int8: with ``quantization``, prefill chunks (> 16 rows) run dynamic int8 W8A8 linears
      (FBGEMM, SmoothQuant-calibrated at load) instead of the dense weights: faster prefill on x86,
      at an accuracy cost (SmolLM2-135M, tool prompts: 0.96 top-1 agreement with fp32, in the prefill and
      on the decode steps that read the KV it wrote); off by default.
    compile: run decode-only steps through ``torch.compile`` (inductor) of `LlamaModel.decode_graph`;
      prefill chunks stay eager. The first steps pay the compile (minutes on a small CPU; cached on
      disk by inductor for the next process); off by default.
    fused_decode: with ``quantization`` ("int8", or "int4": groups of 32 on the GGUF Q4_1 grid) and
      float32 on CPU, run every step (decode rows, prefill chunks, mixed) as one C++ call
      (`decode_fused`: linears, attention, norms, RoPE and SwiGLU fused; built on first use with g++,
      cached on disk).
      With ``prefill_int8`` only decode-only steps (prefill keeps its W8A8 linears). Where the extension
      cannot build, a warning names why and the torch path runs.
    fused_activations: how the fused step's linears (and lm_head) round their float32 inputs, the same
      for every row, so a request's output never depends on what else shares its batch: "int8" per block
      of 32 (GGUF's Q8_1, as llama.cpp does; the fastest) or "int16" (int8 plus its rounding residual:
      twice the multiply work; SmolLM2 int4 decode logits within ~0.01 of float32's, 100% top-1
      agreement vs 96.9% with "int8").
    num_speculative_tokens: prompt-lookup speculation (`engine.speculation`): each step, a greedy
      request may verify up to this many draft tokens copied from its own transcript, in the same
      forward pass as its next token; greedy output is token-identical with it on or off. 0 = off.
      It runs only on the fused C++ step (whose multi-row chunks compute exactly like single rows);
      requests with temperature > 0 never speculate (no acceptance rule is applied to sampling).
      A request's next draft is at most one token longer than its last draft's kept part.
    speculation_max_batch: speculate only while at most this many requests are decoding: a draft row
      costs about what a request's row does, which a lone request's step (bound by reading the
      weights) barely notices and a full batch pays in full for every request in it.
    prompt_lookup_min / prompt_lookup_max: the shortest / longest run of last tokens searched for
      earlier in the transcript (the longest that occurs wins).
    num_threads: torch intra-op threads (None = leave torch's setting alone).
    """

    model: str | None = None
    device: str = "cpu"
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    quantization: Literal["auto", "int8", "int4"] | None = "auto"
    prefill_int8: bool = False
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_gb: float | None = None
    kv_cache_dtype: Literal["auto", "float16", "float32"] = "auto"
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kv_pin_ttl_s: float = 30.0
    compile: bool = False
    fused_decode: bool = False
    fused_activations: Literal["int8", "int16"] = "int8"
    num_speculative_tokens: int = 4
    speculation_max_batch: int = 2
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    num_threads: int | None = None

    def resolved_dtype(self) -> str:
        """The concrete dtype name ("auto" resolved for ``device``)."""
        if self.dtype != "auto":
            return self.dtype
        if str(self.device).startswith("cuda"):
            return "bfloat16"
        return "bfloat16" if _cpu_has_native_bf16() else "float32"

    def resolved(self, quant_type: str | None) -> tuple[EngineConfig, str | None]:
        """This config with ``quantization="auto"`` decided for a model whose weights are
        ``quant_type`` (`engine.loader.LoadedModel.quant_type`), and why the fast path was not
        taken when it could have been (None otherwise): the fused C++ step on the GGUF's own bit
        width, or unquantized."""
        if self.quantization != "auto":
            return self, None
        mode = gguf_fused_mode(quant_type)
        plain = replace(self, quantization=None, fused_activations="int8")  # no C++ step: its precision is moot
        if mode is None:
            why = f"{quant_type} weights have no fused grid" if quant_type else None
            return plain, why
        if self.dtype != "auto" or not str(self.device).startswith("cpu") or self.prefill_int8 or self.compile:
            return plain, None  # the caller pinned a dense path
        from .decode_fused import load_extension, unavailable_reason

        if load_extension() is None:
            return plain, f"the fused C++ step cannot build here ({unavailable_reason()})"
        return replace(self, quantization=mode, dtype="float32", fused_decode=True), None

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in _DTYPES:
            problems.append(f"dtype={self.dtype!r} (choose one of {', '.join(_DTYPES)})")
        if self.quantization not in _QUANT:
            problems.append(f"quantization={self.quantization!r} (choose 'auto', None, 'int8' or 'int4')")
        if self.prefill_int8 and self.quantization in (None, "auto"):
            problems.append("prefill_int8=True needs quantization='int8' or 'int4' (it replaces their dense prefill weights)")
        if self.fused_decode and (self.quantization in (None, "auto") or self.resolved_dtype() != "float32"
                                  or not str(self.device).startswith("cpu")):
            problems.append("fused_decode=True needs quantization='int8' or 'int4', dtype='float32' and device='cpu'")
        if self.fused_activations not in ("int8", "int16"):
            problems.append(f"fused_activations={self.fused_activations!r} (choose 'int8' or 'int16')")
        elif self.fused_activations != "int8" and not self.fused_decode and self.quantization != "auto":
            problems.append(f"fused_activations={self.fused_activations!r} needs fused_decode=True or "
                            "quantization='auto' (it sets the C++ step's precision)")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)!r} (must be >= 1)")
        if self.speculation_max_batch < 1:
            problems.append(f"speculation_max_batch={self.speculation_max_batch!r} (must be >= 1)")
        if self.num_speculative_tokens < 0:
            problems.append(f"num_speculative_tokens={self.num_speculative_tokens!r} (must be >= 0; 0 = off)")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            problems.append(f"prompt_lookup_min={self.prompt_lookup_min!r}, prompt_lookup_max="
                            f"{self.prompt_lookup_max!r} (need 1 <= min <= max)")
        if self.kv_cache_gb is not None and not (self.kv_cache_gb > 0 and math.isfinite(self.kv_cache_gb)):
            problems.append(f"kv_cache_gb={self.kv_cache_gb!r} (must be a number above 0 or None)")
        if self.kv_cache_dtype not in ("auto", "float16", "float32"):
            problems.append(f"kv_cache_dtype={self.kv_cache_dtype!r} (choose 'auto', 'float16' or 'float32')")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            problems.append(f"num_kv_blocks={self.num_kv_blocks!r} (must be >= 1 or None)")
        if not (self.kv_pin_ttl_s >= 0 and math.isfinite(self.kv_pin_ttl_s)):
            problems.append(f"kv_pin_ttl_s={self.kv_pin_ttl_s!r} (must be a number >= 0)")
        if self.max_model_len is not None and self.max_model_len < 2:
            problems.append(f"max_model_len={self.max_model_len!r} (must be >= 2 or None)")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"num_threads={self.num_threads!r} (must be >= 1 or None)")
        if problems:
            raise ValueError("invalid EngineConfig: " + "; ".join(problems))


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 = greedy. top_k 0 = off. seed makes sampling reproducible per request.
    stop: strings that end generation (the text is cut before them; finish_reason "stop").
    stop_token_ids: extra tokens that end generation like EOS. ignore_eos: keep going past EOS.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens!r} (must be >= 1)")
        if not 0 <= self.temperature < math.inf:
            problems.append(f"temperature={self.temperature!r} (must be a finite number >= 0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} (must be in (0, 1])")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} (must be >= 0; 0 = off)")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            problems.append(f"seed={self.seed!r} (must fit in 64 bits: -2**63 to 2**64 - 1)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop={self.stop!r} (must be non-empty strings)")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
