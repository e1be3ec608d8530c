"""A compile worker (``python -m agentrt.engine.grammar.compile_worker``): reads jobs from stdin, forks
each into its own bounded process (`automaton.fork_job`) and writes the outcome to stdout, each message
an 8-byte little-endian length and a pickle. It exits when stdin closes (its parent is gone)."""
from __future__ import annotations

import pickle
import sys
from typing import BinaryIO

from agentrt.engine.grammar.automaton import collect_job, fork_job


def _read(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise SystemExit(0)
    return data


def main() -> None:
    jobs, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        work, memory_bytes = pickle.loads(_read(jobs, int.from_bytes(_read(jobs, 8), "little")))
        outcome = collect_job(*fork_job(work, memory_bytes), None)  # the caller enforces the time limit
        replies.write(len(outcome).to_bytes(8, "little") + outcome)
        replies.flush()


if __name__ == "__main__":
    main()
