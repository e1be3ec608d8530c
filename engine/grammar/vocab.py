"""The token vocabulary as bytes: what text each token id produces when decoded.

Works from the tokenizer alone (never the model): byte-level BPE (GPT-2 style, e.g.
SmolLM2, Llama 3, Qwen) maps its printable stand-in characters back to bytes;
SentencePiece-style vocabularies (Llama 2, Mistral) turn the ``▁`` meta-space into a space
and ``<0xNN>`` byte-fallback tokens into that byte. Special and added control tokens are
excluded (they never appear inside JSON); EOS is kept separately.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass
class TokenVocab:
    """Token id -> bytes for every ordinary token; eos ids; a content hash."""

    token_bytes: dict[int, bytes]
    eos_token_ids: list[int]
    vocab_size: int  # the model's logits width (>= the largest token id + 1)
    kind: str  # "byte_level" | "sentencepiece" | "plain"
    hash: str = field(default="")
    first_byte: np.ndarray = field(init=False, repr=False)  # [vocab_size] int16, -1 = none
    byte_token: dict[int, int] = field(init=False, repr=False)  # byte value -> single-byte token id

    def __post_init__(self) -> None:
        fb = np.full(self.vocab_size, -1, dtype=np.int16)
        self.byte_token = {}
        for tid, b in self.token_bytes.items():
            fb[tid] = b[0]
            if len(b) == 1 and b[0] not in self.byte_token:
                self.byte_token[b[0]] = tid
        self.first_byte = fb
        if not self.hash:
            h = hashlib.sha256()
            h.update(json.dumps([self.kind, self.vocab_size, sorted(self.eos_token_ids)]).encode())
            for tid in sorted(self.token_bytes):
                h.update(tid.to_bytes(4, "little") + len(self.token_bytes[tid]).to_bytes(2, "little") + self.token_bytes[tid])
            self.hash = h.hexdigest()[:24]
        self.max_token_len = max((len(b) for b in self.token_bytes.values()), default=1)
        self._by_bytes: dict[bytes, int] | None = None

    def bytes_to_id(self) -> dict[bytes, int]:
        """bytes -> the lowest token id producing them (for greedy tokenization)."""
        if self._by_bytes is None:
            by: dict[bytes, int] = {}
            for tid in sorted(self.token_bytes):
                by.setdefault(self.token_bytes[tid], tid)
            self._by_bytes = by
        return self._by_bytes


def vocab_from_tokenizer(tokenizer, vocab_size: int | None = None,
                         eos_token_ids: list[int] | None = None) -> TokenVocab:
    """Build the byte vocabulary of a transformers (fast) tokenizer or a `tokenizers.Tokenizer`.

    ``vocab_size`` is the model's logits width (may exceed the tokenizer's); ids at or above
    it are dropped. ``eos_token_ids`` defaults to the tokenizer's eos token.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    spec = json.loads(backend.to_str())
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    special |= set(getattr(tokenizer, "all_special_ids", []) or [])
    kind = _detect_kind(spec)
    width = vocab_size if vocab_size is not None else max(vocab.values()) + 1
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_token_ids = [eos] if eos is not None else []
    if not eos_token_ids:
        raise ValueError("the tokenizer has no eos token: pass eos_token_ids")
    added_plain = {a["id"] for a in spec.get("added_tokens", []) if not a.get("special")}

    dec = _byte_decoder()
    out: dict[int, bytes] = {}
    for tok, tid in vocab.items():
        if tid >= width or tid in special or tid in eos_token_ids:
            continue
        if tid in added_plain:  # added tokens are stored as their literal text
            b = tok.encode("utf-8")
        elif kind == "byte_level":
            try:
                b = bytes(dec[c] for c in tok)
            except KeyError:
                b = tok.encode("utf-8")
        elif kind == "sentencepiece":
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                b = bytes([int(tok[3:5], 16)])
            else:
                b = tok.replace("\u2581", " ").encode("utf-8")
        else:
            b = tok.encode("utf-8")
        if b:
            out[tid] = b
    return TokenVocab(out, list(eos_token_ids), width, kind)


def _detect_kind(spec: dict) -> str:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or "\u2581" in text or "\\u2581" in text or '"ByteFallback"' in text:
        return "sentencepiece"
    return "plain"
