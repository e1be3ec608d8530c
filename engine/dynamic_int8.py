"""Dynamic int8 (W8A8) linear for large batches (prefill chunks) on x86 CPUs, through FBGEMM.

The weight is quantized once (symmetric int8, one scale per output row) and packed by
``quantized::linear_prepack``; each call quantizes its activations and runs FBGEMM's
u8 x s8 -> int32 GEMM (``quantized::linear_dynamic``), which on AVX2 CPUs does about twice the
multiply-adds per cycle of a float32 GEMM. Decode-sized batches should not use it: they are
bound by the weight bytes read, where the weight-only kernels of `engine.quant` win.

FBGEMM quantizes the whole activation matrix with one scale and zero point. One outlier token
would then coarsen every other token's rounding, so by default each row is first mapped onto
[0, 1] by its own min and max (x - min) / (max - min), the single scale then fits every row with
no code wasted on a sign, and the output is mapped back: y = (max - min) * y01 + min * rowsum(W).
Per-token asymmetric activation scales, at the cost of a few cheap elementwise passes.

Channel outliers (a few input channels whose activations are 10-100x the others, as in every
LLM) would still set each row's range. SmoothQuant moves part of them into the weight; the
largest ``outliers`` channels (by calibration max) are taken out of the int8 product altogether
and multiplied in float32 (LLM.int8()'s decomposition), a [M, k] x [k, N] matmul with small k.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

_ENGINE = "fbgemm"
# float32 input channels per layer when calibrated (see the module doc); measured on SmolLM2-135M
DEFAULT_OUTLIERS = 32


def dynamic_int8_available() -> bool:
    """True when torch has the FBGEMM quantized engine (x86 builds); elsewhere use dense linears."""
    return _ENGINE in torch.backends.quantized.supported_engines


class DynamicInt8Linear(nn.Module):
    """y = x @ W.T + bias with W int8 per output row and x quantized to 8 bits on every call.

    per_row: one activation range (min, max) per row (token) instead of one per call (see the module doc).
    act_absmax: [in] max |x| per input channel seen on calibration text; given, the layer applies
      SmoothQuant (weight column c times s_c = absmax_c**alpha / max|W[:, c]|**(1 - alpha), x[:, c] / s_c),
      which flattens the activations' outlier channels that per-row scales cannot.
    outliers: with ``act_absmax``, this many input channels with the largest calibration max are
      computed in float32 outside the int8 product (None = ``DEFAULT_OUTLIERS`` when ``act_absmax``
      is given, else 0).
    reduce_range: 7-bit activations, so FBGEMM's int16 pair sums (u8 * s8 + u8 * s8) cannot
      saturate (AVX2 has no int8 dot product with int32 sums); with 8 bits the [0, 1] rows clip
      often. Costs one bit of activation precision.
    Inputs of any float dtype are computed in float32 and the result is cast back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, per_row: bool = True,
                 reduce_range: bool = True, act_absmax: torch.Tensor | None = None, alpha: float = 0.5,
                 outliers: int | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError(f"DynamicInt8Linear runs FBGEMM on CPU; the weight is on {weight.device}")
        if not dynamic_int8_available():
            raise RuntimeError(f"DynamicInt8Linear needs torch's {_ENGINE!r} quantized engine (x86 builds); "
                               f"this torch has {torch.backends.quantized.supported_engines}")
        w = weight.detach().float()                                          # [N, K]
        n, k = w.shape
        self.register_buffer("inv_smooth", None)
        self.register_buffer("outlier_idx", None)
        self.register_buffer("outlier_weight", None)
        if outliers is None:
            outliers = DEFAULT_OUTLIERS if act_absmax is not None else 0
        if outliers and act_absmax is None:
            raise ValueError("outliers > 0 needs act_absmax (the channels are chosen by calibration)")
        if not 0 <= outliers < k:
            raise ValueError(f"outliers={outliers} must be in [0, {k}) (input channels)")
        if act_absmax is not None:
            if act_absmax.shape != (k,):
                raise ValueError(f"act_absmax has shape {tuple(act_absmax.shape)}; expected ({k},) (one per input)")
            # SmoothQuant: move part of the activations' channel outliers into the weight
            sm = (act_absmax.float().clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha))
            sm = sm.clamp(min=1e-5)                                          # [K]
            inv = 1.0 / sm
            if outliers:
                idx = act_absmax.float().topk(outliers).indices.sort().values   # [k_out]
                self.outlier_idx = idx
                self.outlier_weight = w[:, idx].T.contiguous()               # [k_out, N] for x[:, idx] @ it
                # the smoothing multiply zeroes these channels' int8 input for free; their int8 columns are 0
                sm[idx], inv[idx] = 0.0, 0.0
            w = w * sm
            self.inv_smooth = inv
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)              # [N]
        self.in_features, self.out_features = k, n
        self.per_row, self.reduce_range = per_row, reduce_range
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        prev = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = _ENGINE
            with warnings.catch_warnings():
                # the quantized tensor is only the prepack's input format; it is deprecated in torch 2.1x
                warnings.simplefilter("ignore", UserWarning)
                qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
                # the bias is added after the per-row rescale, so it is not packed
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = prev
        # sum over inputs of the effective int8 weight: the shift of each row's [0, 1] map comes back as min * rowsum
        self.register_buffer("w_rowsum", qw.dequantize().sum(dim=1))         # [N]

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer effectively multiplies x by ([out, in]), smoothing included."""
        qw, _ = torch.ops.quantized.linear_unpack(self._packed)
        w = qw.dequantize()                                                  # [N, K]
        if self.inv_smooth is not None:
            w = w * self.inv_smooth
        if self.outlier_idx is not None:
            w[:, self.outlier_idx] = self.outlier_weight.T
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape                                                      # [..., K]
        x2 = x.reshape(-1, self.in_features).float()                         # [M, K]
        xs = x2 * self.inv_smooth if self.inv_smooth is not None else x2     # outlier channels zeroed
        if self.per_row:
            lo = xs.amin(dim=1, keepdim=True)                                # [M, 1]
            span = (xs.amax(dim=1, keepdim=True) - lo).clamp_(min=1e-30)     # [M, 1]
            # every row onto [0, 1] (a new tensor, x is not touched): FBGEMM's one scale fits all rows
            x01 = (xs - lo).div_(span)
            y = torch.ops.quantized.linear_dynamic(x01, self._packed, self.reduce_range)  # [M, N]
            y.mul_(span).addr_(lo.squeeze(1), self.w_rowsum)
        else:
            y = torch.ops.quantized.linear_dynamic(xs, self._packed, self.reduce_range)
        if self.outlier_idx is not None:
            y.addmm_(x2[:, self.outlier_idx], self.outlier_weight)          # [M, k_out] @ [k_out, N]
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)         # [..., N]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dynamic int8, "
                f"per_row={self.per_row}, reduce_range={self.reduce_range}, "
                f"outliers={0 if self.outlier_idx is None else self.outlier_idx.numel()}")


def collect_input_absmax(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel ([in]) of every ``nn.Linear`` of ``model`` while ``run()`` executes,
    keyed by qualified module name (the calibration SmoothQuant needs)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_mod: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            cur = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()   # [in]
            stats[name] = cur if name not in stats else torch.maximum(stats[name], cur)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_dynamic_int8_(model: nn.Module, act_absmax: dict[str, torch.Tensor] | None = None, *,
                           skip: Callable[[str], bool] = lambda name: name.split(".")[-1] == "lm_head",
                           alpha: float = 0.5) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` (but those ``skip(name)`` keeps, by default
    the lm_head) by a `DynamicInt8Linear`, smoothed with ``act_absmax[name]`` when given (from
    `collect_input_absmax`; a layer missing from it raises KeyError naming it). Returns ``model``."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skip(n)]
    for name, lin in targets:
        if act_absmax is not None and name not in act_absmax:
            raise KeyError(f"no calibration statistics for layer {name!r}; run collect_input_absmax on this model")
        stats = None if act_absmax is None else act_absmax[name]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, DynamicInt8Linear(lin.weight, lin.bias, act_absmax=stats, alpha=alpha))
    return model


# Calibration text for SmoothQuant's per-channel statistics: prose, a chat turn, a JSON tool call and
# code, the kinds of text an agent's prompts hold (the statistics are maxima, so a few hundred tokens do).
CALIBRATION_TEXT = """<|im_start|>system
You are a helpful assistant with access to tools. Call a tool by answering with a JSON object.<|im_end|>
<|im_start|>user
What is the weather in Paris today, and how many kilometres is it from Paris to Berlin?<|im_end|>
<|im_start|>assistant
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 1}}<|im_end|>
<|im_start|>tool
{"temperature": 14.5, "condition": "light rain", "humidity": 0.82, "wind_kmh": 19}<|im_end|>
The history of the city goes back more than two thousand years. Its museums, bridges and markets draw
visitors from every continent, and the river that crosses it has carried trade since Roman times.
def convert(value: float, unit: str = "km") -> float:
    # 1 mile is 1.609344 kilometres
    return value * 1.609344 if unit == "mi" else value
SELECT name, population FROM cities WHERE country = 'FR' ORDER BY population DESC LIMIT 10;
Numbers: 3.14159, 2026-11-23, 42, -7, 1e-5, 100%, $19.99. Lists: apples, pears; A) yes B) no.
"""


def calibrate_llama(model: nn.Module, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """Input max |x| per channel of every linear under ``model.layers`` (names relative to it) over
    one forward of ``token_ids`` through an `engine.model.LlamaModel`, with a scratch KV cache."""
    from .model import AttnMetadata

    a = model.args
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.norm.device)   # [T]
    T = ids.shape[0]
    if T == 0:
        raise ValueError("calibrate_llama: empty token_ids")
    pos = torch.arange(T, device=ids.device)                                      # [T]
    kv = torch.zeros(2, a.num_layers, T, a.num_kv_heads, a.head_dim, dtype=model.norm.dtype, device=ids.device)
    meta = AttnMetadata(slot_mapping=pos, num_decode=0, prefills=[(0, T, pos, None)])
    return collect_input_absmax(model.layers, lambda: model(ids, pos, meta, kv[0], kv[1]))
