"""English-like prompts of exact token lengths for the benchmarks (and tests that want real text)."""
from __future__ import annotations

from typing import Any

_TEXT = ("An agent answers questions by calling tools. It reads the tool specs, decides which tool "
         "to call with which arguments, reads the result and either calls another tool or answers. "
         "Step {i}: the weather in city {i} is {t} degrees and the forecast says rain at {h} o'clock. ")


def text_token_ids(tokenizer: Any, n: int, seed: int, vocab: int) -> list[int]:
    """``n`` token ids of English-like text, different for each seed (falls back to pseudo-random ids
    for tiny tokenizers that need too much text)."""
    parts, ids = [], []
    i = 0
    while len(ids) < n and i < 4 * n:
        parts.append(_TEXT.format(i=seed * 1000 + i, t=(seed * 7 + i) % 40, h=(i % 12) + 1))
        i += 1
        if i % 8 == 0 or len(parts) * 20 >= n:
            ids = tokenizer("".join(parts)).input_ids
    ids = [t for t in ids if t < vocab]
    if len(ids) < n:
        import random

        rnd = random.Random(seed)
        ids += [rnd.randrange(3, vocab) for _ in range(n - len(ids))]
    return ids[:n]
