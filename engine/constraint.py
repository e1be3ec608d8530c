"""The hook through which a request's decoding is constrained (e.g. by a JSON grammar).

The engine knows only this protocol; `agentrt.engine.grammar` implements it. One object
per request, used from the engine's step loop only (no locking needed).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    """Per-request constraint on which tokens may be sampled next.

    The engine's contract, each time it is about to pick the request's next token:

    1. If ``is_terminated()``: the request finishes (finish_reason "stop"), no token is added.
    2. ``forced_tokens()``: if non-empty, these tokens are the only continuation the
       constraint admits. The engine appends them all without sampling, as one prefill
       chunk (jump-forward), calling ``accept_token`` for each, then goes back to 1.
    3. Otherwise it samples from the logits masked with ``next_token_mask()`` and calls
       ``accept_token`` with the sampled token (EOS included: the mask allows EOS only
       where the constraint may end, and accepting it terminates the constraint).

    Optionally a ``closed_by_budget`` attribute: True when the constraint narrowed the
    choices to finish within the token budget; the engine's output reports it. And optionally
    ``count_allowed(token_ids) -> int``: how many leading tokens of a speculative draft it would
    accept in turn (read-only); the engine drafts no further than that.
    """

    def next_token_mask(self) -> torch.Tensor:
        """Bool tensor [vocab_size] (the model's logits width, on CPU): True where allowed."""
        ...

    def accept_token(self, token_id: int) -> None:
        """Advance past ``token_id``. Raises ValueError if the token was not allowed."""
        ...

    def forced_tokens(self) -> list[int]:
        """Tokens that must come next, in order (empty when the model has a choice)."""
        ...

    def is_terminated(self) -> bool:
        """True once the constrained output is complete and nothing more may follow."""
        ...
