"""Picking the next token from logits: constraint masks, greedy, temperature, top-k, top-p, seeds."""
from __future__ import annotations

import torch

from .config import SamplingParams
from .sequence import Sequence


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """In place: set logits [V] of disallowed tokens (allowed is bool [V]) to -inf."""
    if allowed.shape != logits.shape:
        raise ValueError(f"constraint mask has shape {tuple(allowed.shape)}, the logits {tuple(logits.shape)}: "
                         "the mask must cover the model's full logits width")
    if not bool(allowed.any()):
        raise ValueError("constraint mask allows no token at all")
    logits.masked_fill_(~allowed.to(logits.device), float("-inf"))


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] (float32) under temperature / top-k / top-p (temperature > 0)."""
    # Shifted so the best logit is 0 before dividing, and the temperature floored at the dtype's
    # smallest normal number (a smaller one rounds to 0 in float32): any temperature > 0 then gives 0
    # for the best token and finite or -inf values for the rest. Dividing first overflows to inf, and
    # softmax turns inf - inf into nan, on which torch.multinomial raises.
    logits = (logits - logits.max()) / max(params.temperature, torch.finfo(logits.dtype).tiny)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next tokens for logits [N, V] (float32, already masked), one row per sequence."""
    out: list[int] = [0] * logits.shape[0]
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        if len(greedy_rows) == len(params):
            picks = logits.argmax(dim=-1).tolist()
        else:
            picks = logits[greedy_rows].argmax(dim=-1).tolist()
        for i, t in zip(greedy_rows, picks):
            out[i] = t
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_one(logits[i], p, generators[i])
    return out


def sample_constrained(seqs: list[Sequence], logits: torch.Tensor) -> dict[int, int]:
    """{row: token} for the rows of logits [N, V] (float32; masked in place here) of ``seqs``.

    A row whose constraint is terminated ends its sequence with "stop" (no token); a constraint or
    sampling failure ends its own sequence ("abort", error set) and never the others': should the
    batch's sampling raise, each row is sampled alone."""
    live: list[int] = []
    for i, seq in enumerate(seqs):
        c = seq.constraint
        if c is not None:
            try:
                if c.is_terminated():
                    seq.finish_reason = "stop"
                    continue
                apply_mask(logits[i], c.next_token_mask())
            except Exception as exc:  # noqa: BLE001 - a broken constraint fails its own request only
                seq.error, seq.finish_reason = exc, "abort"
                continue
        live.append(i)
    if not live:
        return {}
    rows = logits if len(live) == len(seqs) else logits[live]  # no [N, V] copy in the common case
    try:
        return dict(zip(live, sample(rows, [seqs[i].params for i in live], [seqs[i].generator for i in live])))
    except Exception:  # noqa: BLE001 - resampled row by row below, where each failure is its row's
        picked = {}
        for i in live:
            try:
                picked[i] = sample(logits[i:i + 1], [seqs[i].params], [seqs[i].generator])[0]
            except Exception as exc:  # noqa: BLE001 - this row's sampling failed: its request alone ends
                seqs[i].error, seqs[i].finish_reason = exc, "abort"
        return picked
