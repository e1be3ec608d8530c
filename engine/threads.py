"""Picks torch's intra-op thread count for the serving loop by measuring step times.

On a CPU shared with other busy processes, an intra-op parallel region waits at its barrier
for every thread it started; when one of them is descheduled, each of the few hundred small
ops of a step waits a scheduler time slice. On this 2-core machine under a load of ~7, a
batch-8 decode step of SmolLM2-135M took 4.5 s with 2 threads and 0.27 s with 1 (median of
4 alternating repeats), while on a quiet machine 2 threads are faster. So the serving loop
measures instead of guessing: it alternates the candidates step by step for a short trial,
keeps the one with the lower median step time, and re-tries every so often (load changes;
the wait between trials doubles while the same count keeps winning, as a trial spends half
its steps on the slower count).
"""
from __future__ import annotations

import statistics
from typing import Callable


class ThreadTuner:
    """Chooses between 1 and ``max_threads`` intra-op threads from measured step times.

    Call `before_step` before each engine step (it sets the thread count through
    ``set_threads``) and `after_step` with the step's duration and whether it is comparable
    (the serving loop passes decode-only steps: a prefill chunk's step costs far more, so
    mixing them in would decide by the batch mix, not the thread count). A trial alternates
    the candidates for ``trial_steps`` comparable steps each (alternating, so a change of load
    hits both alike), then the winner runs for ``exploit_steps`` steps before the next trial (twice as
    many after each trial with the same winner, up to ``max_backoff`` times as many).
    """

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], trial_steps: int = 3,
                 exploit_steps: int = 300, max_backoff: int = 16):
        if max_threads < 1 or trial_steps < 1 or exploit_steps < 0:
            raise ValueError("need max_threads >= 1, trial_steps >= 1, exploit_steps >= 0")
        self.candidates = [max_threads, 1] if max_threads > 1 else [1]
        self.set_threads = set_threads
        self.trial_steps = trial_steps
        self.exploit_steps = exploit_steps
        self.max_backoff = max_backoff
        self._backoff = 1
        self.chosen = max_threads
        self._times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self._trial_step = 0  # steps into the current trial (trial_steps * len(candidates) in all)
        self._skipped = 0  # steps of the current trial that were not comparable
        self._exploit_left = 0
        self._current = max_threads
        self.trials = 0

    def before_step(self) -> int:
        """Set (and return) the thread count for the next step."""
        if len(self.candidates) == 1 or self._exploit_left > 0:
            threads = self.chosen
        else:
            threads = self.candidates[self._trial_step % len(self.candidates)]
        if threads != self._current:
            self.set_threads(threads)
            self._current = threads
        return threads

    def restore(self) -> None:
        """Set the thread count back to ``max_threads`` (the loop is ending)."""
        if self._current != self.candidates[0]:
            self.set_threads(self.candidates[0])
            self._current = self.candidates[0]

    def after_step(self, seconds: float, comparable: bool = True) -> None:
        """Record the duration of the step that `before_step` prepared (a trial counts only
        comparable steps; one that sees too few of them is dropped, keeping the last choice)."""
        if len(self.candidates) == 1:
            return
        if self._exploit_left > 0:
            self._exploit_left -= 1
            return
        total = self.trial_steps * len(self.candidates)
        if not comparable:
            self._skipped += 1
            if self._skipped > 20 * total:
                self._end_trial(self.chosen)
            return
        self._times[self._current].append(seconds)
        self._trial_step += 1
        if self._trial_step >= total:
            best = min(self.candidates, key=lambda c: statistics.median(self._times[c]))
            same = self.trials > 0 and best == self.chosen
            self._backoff = min(2 * self._backoff, self.max_backoff) if same else 1
            self.trials += 1
            self._end_trial(best)

    def _end_trial(self, chosen: int) -> None:
        self.chosen = chosen
        for times in self._times.values():
            times.clear()
        self._trial_step = self._skipped = 0
        self._exploit_left = self.exploit_steps * self._backoff
