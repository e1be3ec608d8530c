"""From a sequence's tokens to what a caller sees: incremental text, stop strings, held-back
deltas, metrics (`RequestOutput`). The engine's token-level state stays in `Sequence`; the text
state of each running request lives here."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .detokenize import IncrementalDetokenizer
from .sequence import Sequence


@dataclass
class RequestMetrics:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    forced_tokens: int
    ttft_s: float | None
    decode_s: float
    queue_s: float | None
    draft_tokens_accepted: int = 0  # output tokens verified from prompt-lookup drafts (`engine.speculation`)


@dataclass
class RequestOutput:
    """A request's state after a step: all tokens and text so far, plus the new text."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    delta_text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    error: BaseException | None = None  # set (finish_reason "abort") when the request's constraint failed
    # the constraint narrowed the model's choices to finish within max_tokens (see engine.grammar.GrammarMatcher)
    closed_by_budget: bool = False


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    text: str = ""  # the output's text so far, cut at a stop string
    sent_len: int = 0  # how much of ``text`` earlier deltas delivered


class OutputProcessor:
    """Per request: `update` after each new token (may end the request at a stop string), `output`
    to build the caller's `RequestOutput` (drops the request's text state once it is finished)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def update(self, seq: Sequence) -> None:
        """Detokenize ``seq``'s new tokens; a stop string in the text sets finish_reason "stop"."""
        state = self._state(seq)
        out = seq.output_token_ids
        if seq.stop_token_at_end:
            out = out[:-1]
        # while running, text holds complete characters only (a partial one waits for its next bytes)
        text = state.detokenizer.flush(out) if seq.finished else state.detokenizer.update(out)
        stops = seq.params.stop
        if stops:
            start = max(0, len(state.text) - max(len(s) for s in stops))
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                seq.finish_reason = "stop"
        state.text = text

    def output(self, seq: Sequence) -> RequestOutput:
        """``seq``'s output now: all text so far and the delta since the last output, holding back
        a trailing partial character or a possible beginning of a stop string while it runs."""
        state = self._states.pop(seq.request_id, None) if seq.finished else self._state(seq)
        text = state.text if state is not None else ""
        sent = state.sent_len if state is not None else 0
        safe = len(text) if seq.finished else max(_safe_length(text, seq.params.stop), sent)
        if state is not None:
            state.sent_len = safe
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
                             output_token_ids=list(seq.output_token_ids), text=text[:safe],
                             delta_text=text[sent:safe], finished=seq.finished, finish_reason=seq.finish_reason,
                             metrics=_metrics(seq), error=seq.error,
                             # optional in the TokenConstraint protocol: constraints without a budget lack it
                             closed_by_budget=bool(getattr(seq.constraint, "closed_by_budget", False)))

    def discard(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _state(self, seq: Sequence) -> _TextState:
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = _TextState(IncrementalDetokenizer(self.tokenizer))
        return state


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of a running request's ``text`` can be sent: not a trailing partial character, nor
    an ending that may be the beginning of a stop string."""
    safe = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, safe), 0, -1):
            if text[:safe].endswith(s[:k]):
                safe -= k
                break
    return safe


def _metrics(seq: Sequence) -> RequestMetrics:
    t0 = seq.arrival_time
    end = seq.finish_time or time.perf_counter()
    return RequestMetrics(
        prompt_tokens=seq.num_prompt_tokens, cached_tokens=seq.cached_tokens,
        completion_tokens=seq.num_output_tokens, forced_tokens=seq.forced_tokens,
        ttft_s=seq.first_token_time - t0 if seq.first_token_time else None,
        decode_s=(end - seq.first_token_time) if seq.first_token_time else 0.0,
        queue_s=(seq.first_scheduled_time - t0) if seq.first_scheduled_time else None,
        draft_tokens_accepted=seq.draft_tokens_accepted)
