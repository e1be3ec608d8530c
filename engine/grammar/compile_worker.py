"""A compile worker (``python -m agentrt.engine.grammar.compile_worker``): reads jobs from stdin (each an
8-byte little-endian length and a pickle), runs each under its memory cap (`automaton.run_job`) and
writes the outcome to stdout: its length, one byte saying whether the worker now retires (after a
compile that failed unexpectedly, or once it has grown by half a compile's share), and the pickle. It exits when stdin
closes (its parent is gone) or when it retires."""
from __future__ import annotations

import faulthandler
import os
import pickle
import sys
from typing import BinaryIO

from agentrt.engine.grammar.automaton import run_job, vm_bytes
from agentrt.engine.grammar.compile_job import warm_up


def _read(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise SystemExit(0)
    return data


def lower_priority(nice: int = 10) -> None:
    """Compiles wait for the engine's decode steps, never the other way round. The worker runs in a
    session of its own (Ctrl-C in a terminal is the server's), and Linux's autogroup scheduling
    (``kernel.sched_autogroup_enabled``) shares the CPU fairly between sessions, whatever their
    processes' nice values: a compile took a whole core of two beside a busy server. So the session's
    group is niced, and the process too (what counts where there are no autogroups)."""
    os.nice(nice)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass  # not Linux, or no autogroups


def main() -> None:
    lower_priority()
    # the allocator's own "memory allocation of N bytes failed" (and faulthandler's dump of the abort
    # that follows) stay here: the caller reports the failure, with the limit that caused it
    faulthandler.disable()
    warm_up()
    jobs, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # a job's stray print cannot corrupt the replies
    start = vm_bytes()
    while True:
        work, memory_bytes = pickle.loads(_read(jobs, int.from_bytes(_read(jobs, 8), "little")))
        outcome, ok = run_job(work, memory_bytes)  # the caller enforces the time limit (it kills us)
        retire = not ok or vm_bytes() > start + memory_bytes // 2
        replies.write(len(outcome).to_bytes(8, "little") + bytes([retire]) + outcome)
        replies.flush()
        if retire:
            return


if __name__ == "__main__":
    main()
