"""The fewest tokens a prompt text can take, from its length alone, so that a text far beyond the
context window is refused before it is tokenized (a 1 MB text costs ~0.5 s of a core and ~100 MB
of heap to tokenize only to be refused).

Every character of the text the tokenizer's normalizer leaves is spelled by some token, and no
token spells more characters than its vocabulary string has (byte-level BPE writes a byte per
character, SentencePiece a character per character, byte-fallback tokens six per byte), so a text
of C characters takes at least C / (the longest vocabulary string) tokens. That holds only where
the pre-tokenizer drops nothing: byte-level, Metaspace or none. Elsewhere (a whitespace-splitting
pre-tokenizer, a slow tokenizer) the floor is 0.
"""
from __future__ import annotations

from typing import Any


class TokenFloor:
    """``floor(text)``: a lower bound on the number of tokens ``tokenizer`` makes of ``text``."""

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.max_token_chars: int | None = None
        self._normalizer = None
        if backend is None or not _keeps_every_character(backend.pre_tokenizer):
            return
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=0) or None
        self._normalizer = backend.normalizer

    def __call__(self, text: str) -> int:
        if self.max_token_chars is None:
            return 0
        if self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        return len(text) // self.max_token_chars


def _keeps_every_character(pre_tokenizer: Any) -> bool:
    if pre_tokenizer is None:
        return True
    spec = str(pre_tokenizer)  # e.g. Sequence(pretokenizers=[Split(..., behavior=Isolated), ByteLevel(...)])
    return ("ByteLevel" in spec or "Metaspace" in spec) and "Removed" not in spec and "Whitespace" not in spec
