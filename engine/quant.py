"""Weight-only int8 / int4 quantization of ``nn.Linear`` layers with torch's CPU kernels.

* int8: symmetric, one scale per output row; ``aten._weight_int8pack_mm``.
* int4: asymmetric, one (scale, zero) pair per ``group_size`` input columns of each row
  (gpt-fast / torchao layout), packed by ``aten._convert_weight_to_int4pack_for_cpu`` and
  multiplied by ``aten._weight_int4pack_mm_for_cpu``.

Activations run through the kernels in ``compute_dtype`` (bfloat16 by default: the kernels'
float32 paths are several times slower than a dense float32 matmul on this CPU), and the
result is cast back to the input's dtype, so a float32 model can use them too.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

QuantMode = Literal["int8", "int4"]
_INT4_GROUP_SIZES = (32, 64, 128, 256)


def _check_cpu(weight: torch.Tensor, what: str) -> None:
    if weight.device.type != "cpu":
        raise ValueError(
            f"{what}: weight-only quantization uses torch's CPU kernels; the layer is on {weight.device} "
            "(use quantization=None on CUDA)"
        )


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (q * scale).T + bias with q int8 [out, in] and one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_cpu(weight, "Int8WeightOnlyLinear")
        w = weight.detach().float()                                    # [N, K]
        # Round the scale to the kernel's dtype first, then pick q against that rounded scale.
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(compute_dtype).float()  # [N]
        q = (w / scale[:, None]).round_().clamp_(-128, 127).to(torch.int8)  # in place: one float temporary
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", q.contiguous())                # [N, K] int8
        self.register_buffer("scales", scale.to(compute_dtype))        # [N]
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer effectively multiplies by ([out, in])."""
        return self.weight.float() * self.scales.float()[:, None]

    def _kernel_handles(self, dtype: torch.dtype) -> bool:
        # torch's AVX-512 int8pack kernel reads bf16 activations in blocks of 16 inputs: with any other
        # in_features it returns garbage for one row and crashes (SIGSEGV) for several. AVX2 builds and
        # the float32 / float16 paths are fine, but the CPU a wheel dispatches to is not ours to know.
        return dtype != torch.bfloat16 or self.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape                                                # [..., K]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)    # [M, K]
        if self._kernel_handles(x2.dtype):
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # [M, N]
        else:
            y = (x2.float() @ self.weight.T.float() * self.scales.float()).to(self.compute_dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {self.compute_dtype}"


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W.T + bias with W = (q - 8) * scale + zero per group of ``group_size`` inputs, q in 0..15."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_cpu(weight, "Int4WeightOnlyLinear")
        n, k = weight.shape
        if group_size not in _INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size} (choose one of {_INT4_GROUP_SIZES})")
        if k % group_size:
            raise ValueError(f"int4: in_features={k} is not a multiple of group_size={group_size}")
        w = weight.detach().float().reshape(n, k // group_size, group_size)  # [N, G, gs]
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)                               # [N, G]
        # The kernel computes (q - 8) * scale + zero; scale and zero are rounded to the kernel's
        # dtype first and q is picked against the rounded values.
        scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(compute_dtype).float()
        zero = (lo + 8.0 * scale).to(compute_dtype).float()
        q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        # [G, N, 2]: (scale, zero) for each group of each output row
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer effectively multiplies by ([out, in]), via the kernel itself."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)            # [K, K]
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, self.scales_and_zeros)
        return wt.float().T.contiguous()                                       # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape                                                        # [..., K]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)            # [M, K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)           # [..., N]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}, {self.compute_dtype}")


def quantize_(model: nn.Module, mode: QuantMode, *, include_lm_head: bool = False, group_size: int = 32,
              compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` by a weight-only quantized linear.

    A layer whose qualified name ends in ``lm_head`` is kept unless ``include_lm_head`` (it is often
    tied to the embedding, and the output logits are the most sensitive to rounding). For int4, a layer
    whose in_features is not a multiple of ``group_size`` raises ValueError naming it.
    Returns ``model`` for chaining.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantization mode {mode!r}: choose 'int8' or 'int4'")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (include_lm_head or not name.split(".")[-1] == "lm_head")]
    for name, lin in targets:
        if lin.weight.device.type == "meta":
            raise ValueError(f"{name}: weights are not loaded yet (meta device); quantize after loading")
        try:
            if mode == "int8":
                q: nn.Module = Int8WeightOnlyLinear(lin.weight, lin.bias, compute_dtype)
            else:
                q = Int4WeightOnlyLinear(lin.weight, lin.bias, group_size, compute_dtype)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}: {e}") from e
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, q)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what a decode step reads, roughly)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
