"""A compile worker (``python -m agentrt.engine.grammar.compile_worker``): reads jobs from stdin, forks
each into its own bounded process (`automaton.fork_job`) and writes the outcome to stdout, each message
an 8-byte little-endian length and a pickle. It exits when stdin closes (its parent is gone)."""
from __future__ import annotations

import os
import pickle
import sys
from typing import BinaryIO

from agentrt.engine.grammar.automaton import collect_job, fork_job


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
    jobs, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        work, memory_bytes = pickle.loads(_read(jobs, int.from_bytes(_read(jobs, 8), "little")))
        outcome = collect_job(*fork_job(work, memory_bytes), None)  # the caller enforces the time limit
        replies.write(len(outcome).to_bytes(8, "little") + outcome)
        replies.flush()


if __name__ == "__main__":
    main()
