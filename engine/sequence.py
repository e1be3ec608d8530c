"""`Sequence`: one request's token-level state inside the engine (its text lives in the output
processor)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .config import SamplingParams
from .constraint import TokenConstraint


@dataclass(eq=False)  # identity semantics: sequences live in lists and sets
class Sequence:
    """One request's state inside the engine."""

    request_id: str
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    params: SamplingParams
    constraint: TokenConstraint | None = None
    generator: Any = None  # torch.Generator when seeded
    arrival_time: float = field(default_factory=time.perf_counter)
    # scheduling order, lower first (None = arrival_time): e.g. the start time of the agent run it belongs to
    priority: float | None = None
    # pin the KV under this key when finished, until the key's next sequence arrives (e.g. an agent run's id)
    cache_key: str | None = None
    # KV state
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # tokens proposed to follow token_ids (`engine.speculation`), verified in this step's rows after them
    draft_token_ids: list[int] = field(default_factory=list)
    # the longest draft this sequence proposes next: one more than its last draft kept (None = the
    # engine's setting), so a transcript the drafts keep missing costs one extra row a step, not k
    draft_limit: int | None = None
    # progress
    admitted: bool = False
    cached_tokens: int = 0
    forced_tokens: int = 0
    draft_tokens_accepted: int = 0  # output tokens that came from verified drafts
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    error: BaseException | None = None  # a failing constraint ends only its own request
    stop_token_at_end: bool = False  # the last token is a stop/EOS token (not part of the text)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def order_key(self) -> tuple[float, float]:
        """Scheduling order: (priority, arrival time), smaller first."""
        return (self.arrival_time if self.priority is None else self.priority, self.arrival_time)
