"""The per-request matcher: the engine's TokenConstraint for one JSON-constrained request."""
from __future__ import annotations

import torch

from .compiler import CompiledGrammar


class GrammarMatcher:
    """Tracks one request's position in a CompiledGrammar.

    Every query is a cached per-state look-up on the shared grammar (no loop over the
    vocabulary per step): ``next_token_mask`` is the state's precomputed bool mask,
    ``forced_tokens`` its precomputed jump-forward run.
    """

    def __init__(self, grammar: CompiledGrammar):
        self.grammar = grammar
        self.state: int = grammar.initial_state()
        self._terminated = False
        self._eos = set(grammar.vocab.eos_token_ids)
        self.num_accepted = 0

    def next_token_mask(self) -> torch.Tensor:
        """Bool [vocab_size]: True where allowed (EOS only where the JSON may end). Read-only."""
        if self._terminated:
            mask = torch.zeros(self.grammar.vocab.vocab_size, dtype=torch.bool)
            mask[list(self._eos)] = True
            return mask
        return self.grammar.mask(self.state)

    def accept_token(self, token_id: int) -> None:
        """Advance past ``token_id``; ValueError if the grammar does not allow it here."""
        token_id = int(token_id)
        if self._terminated:
            raise ValueError(f"token {token_id} after the constrained output was complete")
        if token_id in self._eos:
            if not self.grammar.is_final(self.state):
                raise ValueError(f"EOS token {token_id} before the JSON value is complete")
            self._terminated = True
        else:
            nxt = self.grammar.next_state(self.state, token_id)
            if nxt is None:
                raise ValueError(f"token {token_id} is not allowed by the grammar here")
            self.state = nxt
        self.num_accepted += 1

    def forced_tokens(self) -> list[int]:
        """Tokens that must come next (jump-forward); empty when the model has a choice."""
        if self._terminated:
            return []
        return list(self.grammar.forced_tokens(self.state))

    def can_end(self) -> bool:
        """True when the output so far is a complete value (EOS would be accepted)."""
        return self._terminated or self.grammar.is_final(self.state)

    def is_terminated(self) -> bool:
        """True once EOS was accepted, or the value is complete and nothing else may follow."""
        if self._terminated:
            return True
        return self.grammar.is_final(self.state) and not self.grammar.allowed_ids(self.state).size

    def reset(self) -> None:
        self.state = self.grammar.initial_state()
        self._terminated = False
        self.num_accepted = 0
