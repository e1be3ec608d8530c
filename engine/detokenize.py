"""Incremental detokenization: the text of a growing list of output tokens, decoding only a short
window of recent tokens per step instead of the whole output every token (O(1), not O(n), per token).

The window starts at the last point where the text decoded cleanly (vLLM / TGI style): the new text
is ``decode(window) minus decode(window without the newest tokens)``, so tokenizers whose decode of a
lone token differs from its decode in context (SentencePiece's leading space) still come out the same
as one full decode. A trailing partial UTF-8 character ("\\ufffd") is held until the tokens that
complete it arrive; `flush` adds whatever is still pending (what a full decode would show).
"""
from __future__ import annotations

from typing import Any

_PARTIAL = "\ufffd"


class IncrementalDetokenizer:
    """Text so far of one sequence's output tokens. Call `update` with the whole token list each time
    it grows (it must extend the list of the previous call)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.text = ""  # decoded text of ids[:self._read]
        self._prefix = 0  # window start: ids[self._prefix:self._read] give context for the next tokens
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def _pending(self, ids: list[int]) -> str:
        """The text the tokens after ``self._read`` add (may end in a partial character)."""
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:])
        return after[len(before):]

    def update(self, ids: list[int]) -> str:
        """Advance to ``ids`` (all output tokens so far); returns the text of its complete characters."""
        if len(ids) > self._read:
            new = self._pending(ids)
            if new and not new.endswith(_PARTIAL):
                self.text += new
                self._prefix, self._read = self._read, len(ids)
        return self.text

    def flush(self, ids: list[int]) -> str:
        """The final text of ``ids``, including a trailing partial character (as a full decode shows it)."""
        self.update(ids)
        if len(ids) > self._read:
            self.text += self._pending(ids)
            self._prefix = self._read = len(ids)
        return self.text
