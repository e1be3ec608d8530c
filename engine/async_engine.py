"""`AsyncLLMEngine`: an `LLMEngine`'s step loop in a background thread, with one async stream of
outputs per request. It talks to the engine through its public methods only."""
from __future__ import annotations

import asyncio
import atexit
import math
import queue
import threading
import time
import weakref
from typing import Any, AsyncIterator

from .config import SamplingParams
from .constraint import TokenConstraint
from .engine import EngineStats, LLMEngine, RequestOutput
from .sequence import Sequence
from .threads import ThreadTuner


class _Sink:
    """Delivers outputs from the engine thread to one consumer's event loop."""

    def __init__(self, send: Any):
        import sniffio

        self.send = send
        self.loop = None
        self.token = None
        if sniffio.current_async_library() == "asyncio":
            self.loop = asyncio.get_running_loop()
        else:
            import anyio.lowlevel

            self.token = anyio.lowlevel.current_token()

    def put(self, item: Any) -> bool:
        try:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._send, item)
            else:
                import anyio.from_thread

                anyio.from_thread.run_sync(self._send, item, token=self.token)
            return True
        except RuntimeError:  # the consumer's loop is gone
            return False

    def _send(self, item: Any) -> None:
        try:
            self.send.send_nowait(item)
        except Exception:  # noqa: BLE001 - receiver closed: the consumer stopped listening
            pass


# A loop thread still alive when the interpreter finalizes is torn down mid-wait, and the process
# then aborts in torch's thread-pool destructors ("terminate called without an active exception",
# exit code 134), so every engine still running at exit is shut down first.
_live_engines: weakref.WeakSet[AsyncLLMEngine] = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    for engine in list(_live_engines):
        engine.shutdown()


class AsyncLLMEngine:
    """Runs an `LLMEngine`'s step loop in a background thread; async streams per request.

    Usage: ``async for out in aengine.generate_stream(prompt, params): ...``. Leaving the loop
    early (break, cancellation) aborts the request and frees its blocks.

    ``tune_threads``: let the loop pick 1 or the engine's thread count by measuring step times (see
    `engine.threads`); None = on for a CPU engine whose ``num_threads`` is not set explicitly.
    """

    def __init__(self, engine: LLMEngine, tune_threads: bool | None = None):
        self.engine = engine
        if tune_threads is None:
            tune_threads = engine.device.type == "cpu" and engine.config.num_threads is None
        self.thread_tuner = ThreadTuner(engine.runner.threads, engine.runner.set_threads) if tune_threads else None
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="agentrt-engine", daemon=True)
        self._thread.start()
        _live_engines.add(self)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                        constraint: TokenConstraint | None = None, request_id: str | None = None,
                        priority: float | None = None, cache_key: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate now (ContextOverflowError raises here), then stream the request's outputs
        (``priority``: see `LLMEngine.make_sequence`; ``cache_key``: keep its KV pinned for the key's
        next request, see `engine.kv_cache`)."""
        if self._stop:
            raise RuntimeError("the engine is shut down")
        if request_id is not None and request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already streaming")
        seq = self.engine.make_sequence(prompt, params or SamplingParams(), constraint, request_id, priority)
        seq.cache_key = cache_key
        return self._stream(seq)

    async def _stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        import anyio

        send, recv = anyio.create_memory_object_stream(math.inf)
        rid = seq.request_id
        self._sinks[rid] = _Sink(send)
        self._submit(("add", seq))
        done = False
        try:
            async with recv:
                async for item in recv:
                    if isinstance(item, BaseException):
                        done = True
                        raise item
                    if item.error is not None:
                        done = True
                        raise item.error
                    if item.finished:
                        done = True
                    yield item
                    if done:
                        return
        finally:
            self._sinks.pop(rid, None)
            if not done:
                self._submit(("abort", rid))

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       constraint: TokenConstraint | None = None, request_id: str | None = None,
                       priority: float | None = None) -> RequestOutput:
        """Run one request to completion and return its final output."""
        last = None
        async for out in self.generate_stream(prompt, params, constraint, request_id, priority):
            last = out
        assert last is not None
        return last

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def release_cache_key(self, key: str) -> None:
        """Unpin what ``key``'s requests left pinned (the run is over); it stays evictable cache."""
        self._submit(("unpin", key))

    def shutdown(self) -> None:
        """Stop the loop thread; unfinished streams end with finish_reason "abort"."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def __del__(self) -> None:
        self._stop = True
        self._wake.set()

    # ---- the loop thread -------------------------------------------------------------------------
    def _submit(self, cmd: tuple) -> None:
        self._cmds.put(cmd)
        self._wake.set()

    def _drain(self) -> None:
        eng = self.engine
        while True:
            try:
                op, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    eng.add_sequence(arg)
                except Exception as exc:  # noqa: BLE001 - e.g. duplicate id
                    self._deliver_error(arg.request_id, exc)
            elif op == "abort":
                eng.abort_request(arg)
            elif op == "unpin":
                eng.release_cache_key(arg)

    def _deliver_error(self, rid: str, exc: BaseException) -> None:
        sink = self._sinks.get(rid)
        if sink is not None:
            sink.put(exc)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            self._wake.clear()
            self._drain()
            if not eng.has_unfinished_requests():
                self._wake.wait()
                continue
            tuner = self.thread_tuner
            if tuner is not None:
                tuner.before_step()
            t0 = time.perf_counter()
            try:
                outs = eng.step()
                if tuner is not None:
                    tuner.after_step(time.perf_counter() - t0, comparable=eng.last_step_decode_only)
            except Exception as exc:  # noqa: BLE001 - a failed step fails the requests in flight, not the loop
                for rid in eng.fail_all():
                    self._deliver_error(rid, exc)
                continue
            for out in outs:
                sink = self._sinks.get(out.request_id)
                if sink is not None and not sink.put(out):
                    eng.abort_request(out.request_id)
        # shutting down: end every open stream
        self._drain()
        eng.abort_all()
        for out in eng.step():
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put(out)
        if self.thread_tuner is not None:
            self.thread_tuner.restore()
