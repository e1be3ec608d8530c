"""Compiles under limits: a grammar compile (schema -> regex -> byte DFA, see compile_job.py) runs
Rust code that cannot be interrupted from Python, so when a time limit is given it runs in a small
worker process (`CompileWorkers`) that is killed at the deadline (a run-away compile then costs
nothing after the error). The result comes back pickled.

Compiles are bounded together, not only one by one (`CompileGate`): at most ``max_concurrent`` run
at once (``$AGENTRT_GRAMMAR_COMPILES``, default half the cores), at a lower CPU priority than the
engine; each may allocate at most its share of ``$AGENTRT_GRAMMAR_COMPILE_MEMORY_MB`` (default
2048); at most ``max_waiting`` more wait for a slot, and anything beyond is refused with
`GrammarBusyError` at once. `run_bounded` runs any compile step this way (the compiler runs the
whole schema -> regex -> DFA chain in one worker, so nothing of it holds the server's GIL; a step
nested in it, a oneOf proof, is forked from the worker). Before that, the compiler tries the chain in
its own process under tight limits (quick.py): most tool schemas compile in less time than a round
trip to a worker takes, and one that passes those limits costs at most their time more.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from . import quick
from .errors import GrammarBusyError, GrammarCompileError, UnsupportedSchemaError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"${name}={raw!r}: give a whole number") from None
    if value < 1:
        raise ValueError(f"${name}={raw!r}: must be >= 1")
    return value


class CompileGate:
    """Admission for the automaton compiles of this process: ``max_concurrent`` at once, each child
    capped at ``memory_bytes // max_concurrent`` of new memory, ``max_waiting`` queued behind them."""

    def __init__(self, max_concurrent: int | None = None, memory_bytes: int | None = None,
                 max_waiting: int | None = None):
        self.max_concurrent = max_concurrent or _env_int("AGENTRT_GRAMMAR_COMPILES", max(1, (os.cpu_count() or 2) // 2))
        self.memory_bytes = memory_bytes or _env_int("AGENTRT_GRAMMAR_COMPILE_MEMORY_MB", 2048) << 20
        self.max_waiting = max_waiting if max_waiting is not None else 4 * self.max_concurrent
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()
        self._held = threading.local()  # a thread that holds a slot may nest compile steps inside it

    @property
    def child_memory_bytes(self) -> int:
        """New memory one compile's child may allocate (its share of the total)."""
        return self.memory_bytes // self.max_concurrent

    @contextmanager
    def slot(self, timeout_s: float | None) -> Iterator[float | None]:
        """Hold a compile slot; yields the time left of ``timeout_s`` after the wait for it. Re-entrant: a
        step nested in a compile (a oneOf proof inside the schema's compile) uses the slot it runs in."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield timeout_s
            finally:
                self._held.depth -= 1
            return
        t0 = time.perf_counter()
        with self._cond:
            if self.running >= self.max_concurrent:
                if self.waiting >= self.max_waiting:
                    raise GrammarBusyError(f"all {self.max_concurrent} grammar compile slots are busy and "
                                           f"{self.waiting} compiles are already waiting; try again shortly")
                self.waiting += 1
                try:
                    free = self._cond.wait_for(lambda: self.running < self.max_concurrent, timeout=timeout_s)
                finally:
                    self.waiting -= 1
                if not free:
                    raise GrammarBusyError(f"no grammar compile slot came free within the {timeout_s:g}s time "
                                           "limit (other compiles hold them); try again shortly")
            self.running += 1
        self._held.depth = 1
        try:
            yield None if timeout_s is None else timeout_s - (time.perf_counter() - t0)
        finally:
            self._held.depth = 0
            with self._cond:
                self.running -= 1
                self._cond.notify()


gate = CompileGate()


def configure_compiles(max_concurrent: int | None = None, memory_mb: int | None = None,
                       max_waiting: int | None = None) -> CompileGate:
    """Replace this process's compile limits (unset values from the environment / defaults); the
    compiles already running keep their slots in the old gate."""
    global gate
    gate = CompileGate(max_concurrent, None if memory_mb is None else memory_mb << 20, max_waiting)
    return gate


def vm_bytes() -> int:
    """This process's address space size (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _cap_memory(extra_bytes: int) -> None:
    """Limit this compile process's address space to its current size + ``extra_bytes`` (or less: a cap
    already set stays), so a runaway automaton fails its own compile instead of drawing the OOM killer
    onto the server."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = vm_bytes() + extra_bytes
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, soft)  # a compile's own child (a oneOf proof) stays within its parent's cap
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, ImportError):  # not Linux: no cap, the time limit still applies
        pass


_in_compile_child = False


def fork_job(work: Callable[[], Any], memory_bytes: int) -> tuple[int, int]:
    """Fork a process that runs ``work()`` under ``memory_bytes`` of new memory at a low CPU priority and
    writes its pickled outcome to a pipe; returns (its pid, the pipe's read end)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, read_fd
    os.close(read_fd)
    try:
        _child(work, write_fd, memory_bytes)
    finally:
        os._exit(0)


def _child(work: Callable[[], Any], write_fd: int, memory_bytes: int) -> None:
    # the allocator's own "memory allocation of N bytes failed" (and faulthandler's dump of the abort
    # that follows) would land on the server's stderr; the parent reports the failure instead, with
    # the limit that caused it
    faulthandler.disable()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.nice(10)  # a compile waits for the engine's decode steps, never the other way round
    payload, _ = run_job(work, memory_bytes)
    with os.fdopen(write_fd, "wb") as out:
        out.write(payload)


def run_job(work: Callable[[], Any], memory_bytes: int) -> tuple[bytes, bool]:
    """Run ``work()`` in this (compile) process, capped at ``memory_bytes`` of new memory: (its pickled
    outcome, False when it failed unexpectedly: not by a compile's own verdict such as a refused
    keyword). Its own steps (oneOf proofs) are forked from here, one at a time."""
    global gate, _in_compile_child
    _in_compile_child = True
    _cap_memory(memory_bytes)
    gate = CompileGate(1, memory_bytes, 0)
    try:
        return pickle.dumps(("ok", work())), True
    except (GrammarCompileError, UnsupportedSchemaError) as e:  # the compile's own verdict, passed on as it is
        return pickle.dumps(("raise", e)), True
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        return pickle.dumps(("error", f"{type(e).__name__}: {e}")), False


def collect_job(pid: int, read_fd: int, deadline: float | None) -> bytes | None:
    """The pickled outcome of a `fork_job` (("died", exit code) if it ended without one), or None when
    ``deadline`` (a `time.monotonic` time) passed first: the job is then killed."""
    chunks = []
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], wait)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    return b"".join(chunks) or pickle.dumps(("died", os.waitstatus_to_exitcode(status)))


def run_bounded(work: Callable[[], Any], timeout_s: float | None, quick_s: float = 0.0) -> Any:
    """``work()`` under a compile slot: in this process when ``timeout_s`` is None, else in a compile worker
    (a step nested in a compile: a child forked from it) under the time limit and its share of the compile
    memory (``work`` is then pickled: a module function or a partial of one). Its GrammarCompileError or
    UnsupportedSchemaError is raised here as it is; any other failure becomes a GrammarCompileError.

    With ``quick_s``, ``work()`` is first tried in this process as a `quick.attempt` of that many seconds;
    only its result and its UnsupportedSchemaError are final (no limit of the attempt leads to one), and
    anything else it raises sends ``work`` to a worker, whose limits and messages are the real ones. A
    step nested in an attempt runs in the attempt."""
    if quick.limits() is not None:
        return work()
    g = gate
    with g.slot(timeout_s) as left:
        if left is None:
            return work()
        if quick_s > 0:
            t0 = time.perf_counter()
            try:
                with quick.attempt(min(quick_s, left)):
                    return work()
            except UnsupportedSchemaError:
                raise
            except Exception:  # noqa: BLE001 - past a limit, or a failure the worker will name
                left -= time.perf_counter() - t0
        return _run_in_child(work, timeout_s, left, g.child_memory_bytes)


def _run_in_child(work: Callable[[], Any], timeout_s: float, left: float, memory_bytes: int) -> Any:
    deadline = time.monotonic() + max(left, 0.0)
    if _in_compile_child:  # a compile's own step: forked from the (small) compile process itself
        payload = collect_job(*fork_job(work, memory_bytes), deadline)
    else:
        payload = workers.run(work, memory_bytes, deadline)
    if payload is None:
        raise GrammarCompileError(
            f"compiling the schema took longer than its {timeout_s:g}s limit and was stopped "
            "(simplify it: fewer alternatives, smaller enums/maxLength/maxItems, or raise timeout_s)")
    status, value = pickle.loads(payload)
    if status == "raise":
        raise value
    if status == "died":
        raise GrammarCompileError(_died(value, memory_bytes))
    if status != "ok":
        if "memory" in value.lower() or "alloc" in value.lower():
            raise GrammarCompileError(_died(None, memory_bytes) + f" ({value})")
        raise GrammarCompileError(f"the schema could not be compiled: {value}")
    return value


class CompileWorkers:
    """Small processes (``python -m agentrt.engine.grammar.compile_worker``, started on first use, one per
    compile running at once, without torch) that run the compiles. Not forking from the caller: a server
    holds gigabytes that it keeps writing, and each page it wrote while a child forked from it lived
    would exist twice (and the child would be charged for it). Not forking a child per compile either:
    that cost ~10 ms, more than most compiles. A worker that is past its time limit is killed; one
    whose compile failed unexpectedly, or that has grown, retires after its reply."""

    def __init__(self) -> None:
        self._idle: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def run(self, work: Callable[[], Any], memory_bytes: int, deadline: float) -> bytes | None:
        """A job's pickled outcome (see `collect_job`), or None past ``deadline`` (the worker is then
        killed with its job, and a new one starts next time)."""
        job = pickle.dumps((work, memory_bytes))
        worker = self._take()
        try:
            worker.stdin.write(len(job).to_bytes(8, "little") + job)
            worker.stdin.flush()
            header = self._read(worker, 9, deadline)  # the outcome's length (8 bytes), whether it retires
            reply = header and self._read(worker, int.from_bytes(header[:8], "little"), deadline)
        except OSError:  # it died: its job took it down (over the memory cap, say)
            self._stop(worker)
            return pickle.dumps(("died", worker.returncode))
        if reply is None or header[8] or worker.poll() is not None:  # past the deadline, or retiring
            self._stop(worker)
        else:
            with self._lock:
                self._idle.append(worker)
        return reply

    def prestart(self) -> None:
        """Start a worker now, if none is idle, so the first compile does not wait for its start (a
        Python process and its imports: ~0.3 s). Returns at once."""
        with self._lock:
            if not self._idle:
                self._idle.append(self._start())

    def _take(self) -> subprocess.Popen:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._start()

    @staticmethod
    def _start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "agentrt.engine.grammar.compile_worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C in a terminal is the server's, not theirs

    @staticmethod
    def _read(worker: subprocess.Popen, n: int, deadline: float) -> bytes | None:
        fd, data = worker.stdout.fileno(), bytearray()
        while len(data) < n:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise OSError("the compile worker exited")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        """Stop the idle workers (the next compile starts a new one, with the environment as it is then)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            self._stop(worker)

    @staticmethod
    def _stop(worker: subprocess.Popen) -> None:
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # the worker and the job it forked
        except OSError:
            pass
        worker.wait()


workers = CompileWorkers()


def _died(exitcode: int | None, memory_bytes: int) -> str:
    how = "" if exitcode is None or exitcode >= 0 else f" (killed by {signal.Signals(-exitcode).name})"
    return (f"the grammar compile stopped{how}, most likely over the {memory_bytes / (1 << 30):.3g} GiB of memory "
            "a compile may use: simplify the schema (fewer alternatives, bounded repeats such as [ab]{22} after "
            "a *), or raise $AGENTRT_GRAMMAR_COMPILE_MEMORY_MB")
