"""Prompt-lookup speculation: draft the next tokens by finding the sequence's last few tokens
earlier in its own prompt or output, and proposing what followed them there.

Tool-call arguments mostly copy text the transcript already holds (a city from the question, an
id from a tool result), so a draft is often right for several tokens. The engine verifies a draft
in the same step as the sequence's pending token (one multi-row chunk, whose rows compute exactly
like single rows, see `engine.attention_kernel`) and keeps the longest prefix that greedy sampling
would have picked anyway, so the output is token-identical with and without speculation."""
from __future__ import annotations

from array import array
from typing import Callable

from .sequence import Sequence

# ids are stored as int32 so that a run of tokens is a byte string bytes.rfind can search in C
_ITEM = array("i").itemsize
_CANDIDATES = 8  # occurrences tried per n-gram length when the constraint refuses their drafts


def propose_draft(token_ids: list[int], max_draft: int, min_ngram: int, max_ngram: int,
                  count_allowed: Callable[[list[int]], int] | None = None) -> list[int]:
    """Up to ``max_draft`` tokens that followed an earlier occurrence of the sequence's last n
    tokens, for the largest n in [min_ngram, max_ngram] that occurs, the latest occurrence first;
    [] when none does. With ``count_allowed`` (how many leading tokens of a draft the request's
    constraint accepts) each draft is cut there, and an occurrence whose draft is left empty gives
    way to the next older one (up to ``_CANDIDATES`` per n): after a key's `":` a value comes,
    and what followed the same tokens in the prompt's own schema text is often refused."""
    length = len(token_ids)
    if max_draft < 1 or length <= min_ngram:
        return []
    buf = array("i", token_ids).tobytes()
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        pattern = buf[(length - n) * _ITEM:]
        # occurrences that end before the last token, i.e. not the tail itself
        at, tried = buf.rfind(pattern, 0, (length - 1) * _ITEM), 0
        while at >= 0 and tried < _CANDIDATES:
            if at % _ITEM == 0:  # else a match across token boundaries, not a match
                start = at // _ITEM + n
                draft = token_ids[start:start + max_draft]
                if count_allowed is not None:
                    draft = draft[:count_allowed(draft)]
                if draft:
                    return draft
                tried += 1
            at = buf.rfind(pattern, 0, at + len(pattern) - 1)
    return []


def draft_for(seq: Sequence, max_draft: int, min_ngram: int, max_ngram: int, max_model_len: int) -> list[int]:
    """The draft to verify with ``seq``'s pending tokens this step: bounded so that, all accepted
    with the token sampled after them, the request stays within max_tokens and the context
    window; cut before the first token its constraint would refuse (verification would reject
    it anyway: this only saves the rows)."""
    room = min(max_draft, seq.params.max_tokens - seq.num_output_tokens - 1,
               max_model_len - len(seq.token_ids) - 1)
    return propose_draft(seq.token_ids, room, min_ngram, max_ngram, getattr(seq.constraint, "count_allowed", None))
