"""The per-request matcher: the engine's TokenConstraint for one JSON-constrained request."""
from __future__ import annotations

import torch

from .budget import INF, byte_distances, distances
from .compiler import CompiledGrammar
from .errors import BudgetError


class GrammarMatcher:
    """Tracks one request's position in a CompiledGrammar.

    Every query is a cached per-state look-up on the shared grammar (no loop over the
    vocabulary per step): ``next_token_mask`` is the state's precomputed bool mask,
    ``forced_tokens`` its precomputed jump-forward run.

    With ``max_tokens`` (the request's limit; sampled, forced and EOS tokens all count) the
    matcher keeps "fewest tokens to a complete value" (see budget.py) within
    the tokens left: while the budget is ample nothing changes; near the end the mask admits
    only tokens after which the value can still be completed in time, so the output always
    ends as a complete, valid value, at the latest on its last token (``is_terminated()``
    then reports True and the engine stops with finish_reason "stop"). ``closed_by_budget``
    tells whether the budget narrowed a choice (e.g. ended a string the model was still
    writing): the value is valid but may be shorter than the model would have made it.
    """

    def __init__(self, grammar: CompiledGrammar, max_tokens: int | None = None):
        self.grammar = grammar
        self.state: int = grammar.initial_state()
        self._terminated = False
        self._eos = set(grammar.vocab.eos_token_ids)
        self._eos_ids = torch.tensor(sorted(self._eos), dtype=torch.long)
        self.num_accepted = 0
        self.max_tokens = max_tokens
        self.closed_by_budget = False
        self._bound = None  # ByteDistances: cheap, over-counts; proves most steps are not tight
        self._dist = None  # TokenDistances, computed only once the bound cannot prove that
        if max_tokens is not None:
            if max_tokens < 1:
                raise BudgetError(f"max_tokens={max_tokens} must be at least 1")
            self._bound = byte_distances(grammar)
            if self._bound.of(self.state) > max_tokens and self._count_tokens():
                need = self._dist.of(self.state)  # type: ignore[union-attr]
                if need >= INF:
                    raise BudgetError("the schema admits no value this tokenizer can spell out")
                if need > max_tokens:
                    raise BudgetError(f"max_tokens={max_tokens} is below the {need} tokens the schema needs "
                                      f"at minimum; raise max_tokens to at least {need}")

    def _count_tokens(self) -> bool:
        """Switch to the grammar's TokenDistances; False (and unbudgeted from now on) when the grammar is
        too large to plan for."""
        if self._dist is None:
            dist = distances(self.grammar)
            if not dist.complete:
                self._bound = None
                return False
            self._dist = dist
        return True

    def tokens_left(self) -> int | None:
        """Tokens the request may still add, or None without a budget."""
        return None if self.max_tokens is None else self.max_tokens - self.num_accepted

    def _tight(self) -> bool:
        """Whether some allowed token could leave too few tokens to finish the value."""
        if self._bound is None:
            return False
        left = self.max_tokens - self.num_accepted  # type: ignore[operator]
        for d in (self._bound, self._dist):  # the byte bound first: if it fits, the token count does
            if d is None:
                if not self._count_tokens():
                    return False
                d = self._dist
            if not (d.max_dist > left - 1 and d.worst_next(self.state) > left - 1):  # type: ignore[union-attr]
                return False
        return True

    def next_token_mask(self) -> torch.Tensor:
        """Bool [vocab_size]: True where allowed (EOS only where the JSON may end). Read-only."""
        if self._terminated:
            mask = torch.zeros(self.grammar.vocab.vocab_size, dtype=torch.bool)
            mask[self._eos_ids] = True
            return mask
        if not self._tight():
            return self.grammar.mask(self.state)
        left = self.max_tokens - self.num_accepted  # type: ignore[operator]
        ids, dist = self._dist.successors(self.state)  # type: ignore[union-attr]  # [n], [n]
        keep = torch.from_numpy(ids[dist <= left - 1])  # [k] tokens after which the value still fits
        mask = torch.zeros(self.grammar.vocab.vocab_size, dtype=torch.bool)
        mask[keep] = True
        if self.grammar.is_final(self.state):
            mask[self._eos_ids] = True
        self.closed_by_budget = True
        return mask

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
        """Tokens that must come next (jump-forward); empty when the model has a choice.

        Under a budget the run is cut where its tokenization would leave too few tokens to
        finish (the mask then picks the shortest spelling)."""
        if self._terminated:
            return []
        run = list(self.grammar.forced_tokens(self.state))
        if self._bound is None or not run:
            return run
        keep = self._fitting(run, self._bound if self._dist is None else self._dist)
        if keep < len(run) and self._dist is None and self._count_tokens():
            keep = self._fitting(run, self._dist)
        return run[:keep]

    def _fitting(self, run: list[int], dist) -> int:
        """How many leading tokens of ``run`` leave enough tokens to finish, by ``dist``."""
        left = self.max_tokens - self.num_accepted  # type: ignore[operator]
        s, keep = self.state, 0
        for i, t in enumerate(run, 1):
            s = self.grammar.next_state(s, t)  # type: ignore[assignment]
            if s is None or dist.of(s) > left - i:
                break
            keep = i
        return keep

    def count_allowed(self, token_ids: list[int]) -> int:
        """How many leading ``token_ids`` the grammar accepts one after another from here, EOS
        excluded (read-only; the budget's narrowing is not applied, the mask applies it)."""
        if self._terminated:
            return 0
        state = self.state
        for i, token_id in enumerate(token_ids):
            nxt = None if token_id in self._eos else self.grammar.next_state(state, token_id)
            if nxt is None:
                return i
            state = nxt
        return len(token_ids)

    def can_end(self) -> bool:
        """True when the output so far is a complete value (EOS would be accepted)."""
        return self._terminated or self.grammar.is_final(self.state)

    def is_terminated(self) -> bool:
        """True once EOS was accepted, or the value is complete and nothing else may follow
        (no allowed token, or the budget is spent)."""
        if self._terminated:
            return True
        if not self.grammar.is_final(self.state):
            return False
        if not self.grammar.may_continue(self.state):
            return True
        if self._bound is not None and self.num_accepted >= self.max_tokens:  # type: ignore[operator]
            self.closed_by_budget = True  # the model could have gone on (e.g. more digits)
            return True
        return False

    def reset(self) -> None:
        self.state = self.grammar.initial_state()
        self._terminated = False
        self.num_accepted = 0
        self.closed_by_budget = False
