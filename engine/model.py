"""A compact Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) that reads and writes a paged KV cache.

Written for the engine's step: one flat batch of T tokens from many sequences. The first
``num_decode`` tokens are one-token sequences (decode, or a one-token prefill chunk); after them come
prefill chunks, one contiguous range per sequence. Each layer writes the new keys/values to their
cache slots, then every query attends to its sequence's slots (gathered through the block table).

q/k/v and gate/up projections are fused into one matmul each at load time (fewer, larger ops: the
step of a small model on CPU is dominated by per-op overhead). All projections stay `nn.Linear`, so
weight-only quantization can swap them in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


@dataclass
class ModelArgs:
    """The architecture numbers the forward needs, read from an HF ``config.json`` dict."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if config.get(k) is None]
        if missing:
            raise ValueError(f"model config lacks required keys: {', '.join(missing)}")
        model_type = config.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}: the engine runs llama, mistral and qwen2")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # qwen2 has q/k/v biases without saying so in its config
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        )


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32) with the config's theta and scaling
    (none/default, linear, llama3; dynamic NTK is refused rather than silently wrong)."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = torch.where(is_mid, mid, scaled)
    else:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    return inv.float()


def _interleave_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotate-half pairs (i, i + hd/2) to adjacent pairs
    (2i, 2i + 1), so RoPE is a complex multiply. q and k get the same order, so q.k is unchanged."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # [hd]
    shape = w.shape
    return w.reshape(-1, head_dim, *shape[1:])[:, perm].reshape(shape)


def _rope_real(pairs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs [..., d/2, 2] as real arithmetic (the complex multiply written out,
    which torch.compile can generate code for); cos/sin broadcast to [..., d/2]."""
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


class DecodeQuantLinear(nn.Module):
    """A linear that keeps its dense weight for prefill and a weight-only quantized copy for decode.

    Small batches (decode: a few rows) are bound by the weight bytes read, where int8/int4 win;
    large batches (prefill chunks) are bound by compute, where the quantized kernels run slower than
    a dense matmul on CPUs without native low-precision GEMM. Above ``max_rows`` rows the dense
    weight is used.
    """

    def __init__(self, dense: nn.Linear, quantized: nn.Module, max_rows: int = 16):
        super().__init__()
        self.dense = dense
        self.quantized = quantized
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K]
        # .forward directly: a decode step makes 120+ of these calls, nn.Module.__call__ costs each
        return self.quantized.forward(x) if x.shape[0] <= self.max_rows else self.dense.forward(x)


class ReleasedLinear(nn.Module):
    """Stands where a linear was whose weights only the fused C++ step holds."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: this engine runs every step in the fused C++ step, which holds the "
                           "layer weights; the torch forward has none")


@dataclass
class AttnMetadata:
    """Where a step's tokens write their K/V and what each query attends to.

    slot_mapping: [T] cache slot of each token's new K/V.
    num_decode: the first ``num_decode`` tokens are one-token sequences.
    decode_slots: [B, Lmax] the slots each one-token query attends to (padded with 0), or, when
      B == 1 and that sequence's slots are consecutive, a ``slice`` of them: the keys are then read
      as a view of the cache instead of gathered (a copy of the whole context per layer per token).
    decode_mask: [B, 1, 1, Lmax] bool, True = attend (None when all B lengths are equal).
    prefills: per multi-token chunk (start, end, slots [L] or a ``slice`` when consecutive,
      mask [n, L] bool or None = plain causal, L == n).
    """

    slot_mapping: torch.Tensor
    num_decode: int
    decode_slots: torch.Tensor | slice | None = None
    decode_mask: torch.Tensor | None = None
    prefills: list[tuple[int, int, torch.Tensor | slice, torch.Tensor | None]] = field(default_factory=list)


class DecoderLayer(nn.Module):
    """One pre-norm block: RMSNorm, fused qkv, RoPE, attention (given by the caller: paged for the
    step, gathered for the pure decode graph), o_proj, RMSNorm, fused gate/up SwiGLU, down_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hd, nh, nkv, h = args.head_dim, args.num_heads, args.num_kv_heads, args.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim, self.eps = nh, nkv, hd, args.rms_norm_eps
        self.qkv_proj = nn.Linear(h, (nh + 2 * nkv) * hd, bias=args.attention_bias, device="meta")
        self.o_proj = nn.Linear(nh * hd, h, bias=False, device="meta")
        self.gate_up_proj = nn.Linear(h, 2 * args.intermediate_size, bias=False, device="meta")
        self.down_proj = nn.Linear(args.intermediate_size, h, bias=False, device="meta")
        self.input_layernorm = nn.Parameter(torch.empty(h, device="meta"), requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(torch.empty(h, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor],
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x: [T, H], updated in place (the model's own tensor) and returned.
        rope: rotates pairs [T, nh + nkv, hd/2, 2] (float32, interleaved pair order) by position;
        attend: (q [T, nh, hd], k [T, nkv, hd], v [T, nkv, hd]) -> [T, nh * hd]."""
        T = x.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qk_dim = (nh + nkv) * hd
        hsz = x.shape[-1:]
        h = F.rms_norm(x, hsz, self.input_layernorm, self.eps)
        qkv = self.qkv_proj(h)  # [T, (nh + 2 nkv) hd]
        # RoPE on q and k at once, in float32 (a no-op cast for float32 models)
        qk = rope(qkv[:, :qk_dim].float().view(T, nh + nkv, hd // 2, 2)).flatten(2).to(x.dtype)  # [T, nh+nkv, hd]
        v = qkv[:, qk_dim:].view(T, nkv, hd)
        x.add_(self.o_proj(attend(qk[:, :nh], qk[:, nh:], v)))
        h = F.rms_norm(x, hsz, self.post_attention_layernorm, self.eps)
        g, u = self.gate_up_proj(h).chunk(2, dim=-1)  # [T, I] each
        return x.add_(self.down_proj(F.silu(g).mul_(u)))  # silu allocates a contiguous [T, I]; mul in place


class LlamaModel(nn.Module):
    """The decoder. Build with `LlamaModel.from_weights(config, hf_weights, dtype, device)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # built around an empty meta weight: nn.Embedding's own init of a meta tensor goes through
        # torch._refs and imports torch._dynamo (sympy, mpmath: ~900 modules, a second and ~100 MB)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size, device="meta"))
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.empty(args.hidden_size, device="meta"), requires_grad=False)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
        self._eps = args.rms_norm_eps
        # RoPE as real arithmetic instead of one complex multiply: torch.compile cannot generate
        # code for complex ops (eager prefers the single complex op)
        self.rope_real = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                     device: str | torch.device = "cpu", max_len: int | None = None) -> "LlamaModel":
        """Build from HF-Llama-named weights (q/k in HF layout), fusing qkv and gate/up.
        ``max_len`` sizes the RoPE tables (default: the config's max_position_embeddings)."""
        args = ModelArgs.from_config(config)
        model = cls(args)

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            return weights[name]

        def param(t: torch.Tensor) -> nn.Parameter:
            out = t.to(device=device, dtype=dtype).contiguous()
            if out.data_ptr() == t.data_ptr():
                # a copy, never a view of the checkpoint: a memory-mapped file stays mapped (and its
                # pages resident) while any tensor of it lives
                out = out.clone()
            return nn.Parameter(out, requires_grad=False)

        model.embed_tokens.weight = param(w("model.embed_tokens.weight"))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            # q/k rows go to the interleaved RoPE layout (see _interleave_heads); v stays as is
            q, k = (_interleave_heads(w(a + "q_proj.weight"), args.head_dim),
                    _interleave_heads(w(a + "k_proj.weight"), args.head_dim))
            layer.qkv_proj.weight = param(torch.cat([q, k, w(a + "v_proj.weight")]))
            if args.attention_bias:
                qb, kb = (_interleave_heads(w(a + "q_proj.bias"), args.head_dim),
                          _interleave_heads(w(a + "k_proj.bias"), args.head_dim))
                layer.qkv_proj.bias = param(torch.cat([qb, kb, w(a + "v_proj.bias")]))
            layer.o_proj.weight = param(w(a + "o_proj.weight"))
            layer.gate_up_proj.weight = param(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]))
            layer.down_proj.weight = param(w(p + "mlp.down_proj.weight"))
            layer.input_layernorm = param(w(p + "input_layernorm.weight"))
            layer.post_attention_layernorm = param(w(p + "post_attention_layernorm.weight"))
        model.norm = param(w("model.norm.weight"))
        if args.tie_word_embeddings or "lm_head.weight" not in weights:
            model.lm_head.weight = model.embed_tokens.weight
        else:
            model.lm_head.weight = param(w("lm_head.weight"))

        model._add_rope_tables(max_len or args.max_position_embeddings, device)
        return model.eval()

    @classmethod
    def for_fused_step(cls, config: dict, embed_tokens: nn.Module, lm_head: nn.Module, norm: torch.Tensor,
                       layer_norms: list[tuple[torch.Tensor, torch.Tensor]], max_len: int | None = None) -> "LlamaModel":
        """A float32 CPU model whose layers hold only their norms: the fused C++ step holds the linears
        (`decode_fused.FusedDecoder`), ``embed_tokens`` and ``lm_head`` are given (read from packed
        grids), so no float copy of a weight matrix exists. ``layer_norms``: (input, post-attention) per
        layer."""
        args = ModelArgs.from_config(config)
        model = cls(args)
        model.embed_tokens, model.lm_head = embed_tokens, lm_head
        model.norm = nn.Parameter(norm, requires_grad=False)
        for i, (layer, (pre, post)) in enumerate(zip(model.layers, layer_norms, strict=True)):
            layer.input_layernorm = nn.Parameter(pre, requires_grad=False)
            layer.post_attention_layernorm = nn.Parameter(post, requires_grad=False)
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                setattr(layer, name, ReleasedLinear(f"layers.{i}.{name}"))
        model._add_rope_tables(max_len or args.max_position_embeddings, "cpu")
        return model.eval()

    def _add_rope_tables(self, n: int, device: str | torch.device) -> None:
        inv = rope_inv_freq(self.args)
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # [n, hd/2]
        self.register_buffer("rope_cis", torch.polar(torch.ones_like(freqs), freqs).to(device),
                             persistent=False)  # [n, hd/2] complex64
        self.register_buffer("rope_cos", freqs.cos().to(device), persistent=False)  # [n, hd/2] for rope_real
        self.register_buffer("rope_sin", freqs.sin().to(device), persistent=False)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; k_cache/v_cache: [layers, slots, n_kv, head_dim].
        Writes the tokens' K/V to their slots; returns the final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)  # [T, H]
        rope = self._rope(positions)
        for i, layer in enumerate(self.layers):
            # .forward directly: nn.Module.__call__ costs each of the layers of every step
            x = layer.forward(x, rope, partial(self._paged_attention, k_cache[i], v_cache[i], meta))
        return F.rms_norm(x, x.shape[-1:], self.norm, self._eps)

    def decode_graph(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_slots: torch.Tensor,
                     kv_mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step of B one-token sequences as a pure function, the form ``torch.compile`` turns into a
        few fused kernels: it does not write the cache (a graph that mutates a view of a graph input
        may copy the whole pool back); it returns the new keys/values for the caller to write, one op
        for all layers, and attends to the gathered earlier tokens plus the new token.

        input_ids, positions: [B]; kv_slots: [B, Lp] slots of each sequence's earlier tokens (padded,
        Lp bucketed so shapes repeat); kv_mask: [B, 1, 1, Lp + 1] bool, True = attend (the last column
        is the new token); k_cache/v_cache: [layers, slots, n_kv, head_dim], read only.
        Returns hidden [B, H] and the new k, v [layers, B, n_kv, head_dim]."""
        cos = self.rope_cos[positions].unsqueeze(1)  # [B, 1, hd/2]
        sin = self.rope_sin[positions].unsqueeze(1)
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            B, nh, hd = q.shape
            ks.append(k)
            vs.append(v)
            kd = torch.cat([k_cache[i][kv_slots], k.unsqueeze(1)], dim=1).transpose(1, 2)  # [B, nkv, Lp+1, hd]
            vd = torch.cat([v_cache[i][kv_slots], v.unsqueeze(1)], dim=1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=kv_mask, enable_gqa=True)
            return o.reshape(B, nh * hd)

        x = self.embed_tokens(input_ids)  # [B, H]
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, partial(_rope_real, cos=cos, sin=sin), partial(attend, i))
        return F.rms_norm(x, x.shape[-1:], self.norm, self._eps), torch.stack(ks), torch.stack(vs)

    def _rope(self, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """RoPE for tokens at ``positions`` [T] on pairs [T, heads, hd/2, 2]: one complex multiply,
        or the real form under torch.compile (``rope_real``), which cannot generate complex ops."""
        if self.rope_real:
            return partial(_rope_real, cos=self.rope_cos[positions].unsqueeze(1),  # [T, 1, hd/2]
                           sin=self.rope_sin[positions].unsqueeze(1))
        cis = self.rope_cis[positions].unsqueeze(1)  # [T, 1, hd/2] complex
        return lambda pairs: torch.view_as_real(torch.view_as_complex(pairs) * cis)

    @staticmethod
    def _paged_attention(kc: torch.Tensor, vc: torch.Tensor, meta: AttnMetadata, q: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write one layer's new k/v [T, nkv, hd] to their slots, then attend (see `_attention`)."""
        kc.index_copy_(0, meta.slot_mapping, k)
        vc.index_copy_(0, meta.slot_mapping, v)
        return LlamaModel._attention(q, kc, vc, meta)

    @staticmethod
    def _attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        T, nh, hd = q.shape
        B = meta.num_decode
        out = None
        if B:
            qd = q[:B].unsqueeze(2)  # [B, nh, 1, hd]
            if isinstance(meta.decode_slots, slice):  # B == 1, consecutive slots: views, no copy
                kd = kc[meta.decode_slots].transpose(0, 1).unsqueeze(0)  # [1, nkv, L, hd]
                vd = vc[meta.decode_slots].transpose(0, 1).unsqueeze(0)
            else:
                kd = kc[meta.decode_slots].transpose(1, 2)  # [B, nkv, Lmax, hd]
                vd = vc[meta.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
            if B == T:
                return od.reshape(T, nh * hd)  # [B, nh, 1, hd] -> [T, nh*hd]
            out = q.new_empty(T, nh, hd)
            out[:B] = od.squeeze(2)
        if out is None:
            out = q.new_empty(T, nh, hd)
        for start, end, slots, mask in meta.prefills:
            qp = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, nh, n, hd]
            kp = kc[slots].transpose(0, 1).unsqueeze(0)  # [1, nkv, L, hd]
            vp = vc[slots].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None,
                                                enable_gqa=True)
            out[start:end] = op[0].transpose(0, 1)
        return out.view(T, nh * hd)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
