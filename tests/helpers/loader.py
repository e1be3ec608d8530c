"""Test helpers: a tiny random-weights Llama as an HF folder and as a GGUF file.

The tiny model has a real byte-level BPE tokenizer (trained here on a few sentences, so
there is no download) and a ChatML chat template, so every loader path runs in well under
a second. Other test files may import these helpers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Call the weather tool with the city name and return JSON.",
    '{"calls":[{"tool":"get_weather","arguments":{"city":"Paris"}}]}',
    "Hello world! How are you today? 0123456789",
] * 20


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE fast tokenizer with ChatML specials (ids 0, 1, 2) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(*, tie: bool = True, num_layers: int = 2, seed: int = 0, bias: bool = False, vocab_size: int = 320,
               hidden_size: int = 64, intermediate_size: int = 128, head_dim: int = 16):
    """A random-weights transformers LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads, head_dim 16 unless told)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                      rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=tie,
                      attention_bias=bias, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a wrong name mapping cannot hide behind all-ones
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def write_tiny_hf_folder(path: Path, *, tie: bool = True, bias: bool = False):
    """Save a tiny Llama (safetensors) and its tokenizer into ``path``; returns the transformers model."""
    model = tiny_llama(tie=tie, bias=bias)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(path))
    return model


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py LlamaModel.permute), for writing test GGUFs."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, model, tokenizer, *, q8_names: tuple[str, ...] = (), name: str = "tiny-llama",
                    arch: str = "llama", quant: str | None = None) -> Path:
    """Write ``model`` (a transformers Llama) as a GGUF the way llama.cpp does (``arch`` "llama": q/k rows
    permuted; "qwen2": HF's row order).

    Tensors are F32 except those whose GGUF name is in ``q8_names`` (stored as Q8_0) and, with ``quant``
    (a type gguf-py can quantize: Q8_0, Q4_0, Q4_1...), every 2-D weight.
    """
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
                               else cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    # tokenizer (gpt2-style BPE, as llama.cpp writes it)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3 = control, 1 = normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)

    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for hf, t in sd.items():
        arr = t.detach().float().numpy().copy()
        if hf in names:
            g = names[hf]
        else:
            parts = hf.split(".")  # model.layers.{i}.<sub>.<weight|bias>
            g = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        if ".q_proj." in hf and arch == "llama":
            arr = llamacpp_permute(arr, nq)
        elif ".k_proj." in hf and arch == "llama":
            arr = llamacpp_permute(arr, nkv)
        if g in q8_names or (quant and arr.ndim == 2):
            qt = getattr(gguf.GGMLQuantizationType, quant if arr.ndim == 2 and quant else "Q8_0")
            w.add_tensor(g, quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
