"""The engine's one thread: the engine is not thread-safe, so every call to it happens here.

HTTP handlers run on the asyncio loop and talk to the worker through two thread-safe inboxes (new requests,
cancellations); the worker loops: take what arrived, add it to the engine, apply cancellations, run one `step`,
hand each request's output to its asyncio queue with `loop.call_soon_threadsafe`. With nothing to do it sleeps on a
condition, so an idle server costs no CPU.

The waiting queue is bounded: at most `max_running + max_waiting` requests are accepted and unfinished at once;
`submit` refuses the next with `QueueFull` (the server's 429) instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from ar2dlm.engine import DecodeParams, Engine, GenerationResult

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every running row is taken and `max_waiting` requests already wait."""


class WorkerStopped(Exception):
    """The server is shutting down."""


@dataclass
class Update:
    """One forward's news for one request (or its failure)."""

    delta: str = ""  # new streamable text
    new_tokens: tuple[int, ...] = ()  # tokens that joined the decoded prefix in this forward
    forward: int = 0  # this request's forward count so far: the forward that committed `new_tokens`
    result: GenerationResult | None = None  # set on the last update
    error: Exception | None = None  # the engine refused or failed the request: no more updates follow


class Handle:
    """The asyncio side of one request: its id and the queue its updates arrive on."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self.loop = request_id, loop
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.forwards = 0  # written by the worker thread only
        self.t_submitted = time.perf_counter()

    async def next(self, timeout: float | None) -> Update:
        """The next update; TimeoutError when none comes within `timeout` seconds."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    def push(self, update: Update) -> None:
        """From the worker thread: queue the update on the handle's loop (gone when the server is closing)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, update)
        except RuntimeError:
            pass


class EngineThread:
    """One OS thread for all of a server's torch work: opening the model and building the engine (`call`), then the
    engine loop (`EngineWorker(..., thread=)`). On a CPU, a model opened on one thread and decoded on another ran at
    less than half the tokens/s (2 cores, SmolLM2-135M: 5-6 against 13-15; each thread that runs parallel torch code
    keeps its own OpenMP thread team, and the idle one competes with the busy one)."""

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="ar2dlm-engine", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            task()

    def call(self, fn):
        """`fn()` run on the thread; its result, or its exception raised here."""
        done, box = threading.Event(), {}

        def task():
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e
            finally:
                done.set()

        self._tasks.put(task)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def run_last(self, fn) -> None:
        """Run `fn` on the thread, then let the thread end."""
        self._tasks.put(fn)
        self._tasks.put(None)


class EngineWorker:
    def __init__(self, engine: Engine, max_waiting: int, metrics=None, thread: EngineThread | None = None):
        """`thread`: the EngineThread that built `engine`, to run the loop on (else a fresh one)."""
        self.engine, self.metrics = engine, metrics
        self._engine_thread = thread
        self.capacity = engine.max_running + max_waiting
        self._cond = threading.Condition()
        self._inbox: list[tuple[Handle, list[int], DecodeParams]] = []
        self._cancels: list[str] = []
        self._live: dict[str, Handle] = {}  # accepted and not finished; guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ asyncio side
    def submit(self, prompt_ids: list[int], params: DecodeParams) -> Handle:
        """Queue a request from a coroutine; its updates arrive on the returned handle."""
        handle = Handle(uuid.uuid4().hex, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise WorkerStopped()
            if len(self._live) >= self.capacity:
                raise QueueFull()
            self._live[handle.request_id] = handle
            self._inbox.append((handle, prompt_ids, params))
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone, deadline passed); its cache row is freed before the next forward."""
        with self._cond:
            if request_id in self._live:
                self._cancels.append(request_id)
                self._cond.notify()

    @property
    def unfinished(self) -> int:
        with self._cond:
            return len(self._live)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        engine_thread = self._engine_thread or EngineThread()
        engine_thread.run_last(self._run)
        self._thread = engine_thread.thread

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or self._stopping or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    break
                arrived, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for handle, ids, params in arrived:
                self._add(handle, ids, params)
            for request_id in cancels:
                self._cancel(request_id)
            self._step()
        self._fail_all(WorkerStopped("the server is shutting down"))

    def _add(self, handle: Handle, ids: list[int], params: DecodeParams) -> None:
        try:
            self.engine.add_request(ids, params, request_id=handle.request_id)
        except Exception as e:  # noqa: BLE001 - the handler tells the client; the worker must go on
            self._finish(handle, Update(error=e))

    def _cancel(self, request_id: str) -> None:
        with self._cond:
            handle = self._live.pop(request_id, None)
        if handle is not None and self.engine.abort(request_id):
            log.debug("request %s cancelled", request_id)

    def _step(self) -> None:
        if self.engine.has_unfinished():
            before = self.engine.forwards
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(e)
                return
            if self.metrics is not None:
                self.metrics.forwards.inc(self.engine.forwards - before)
            for out in outputs:
                self._dispatch(out)
        if self.metrics is not None:
            self.metrics.observe_load(waiting=self.engine.num_waiting + len(self._inbox),
                                      running=self.engine.num_running)

    def _dispatch(self, out) -> None:
        with self._cond:
            handle = self._live.get(out.request_id)
        if handle is None:  # cancelled while its forward ran
            return
        handle.forwards += 1
        update = Update(out.delta, tuple(out.new_tokens), handle.forwards, out.result)
        if out.finished:
            if self.metrics is not None:
                self.metrics.observe_result(out.result)
            self._finish(handle, update)
        else:
            handle.push(update)

    def _finish(self, handle: Handle, update: Update) -> None:
        with self._cond:
            self._live.pop(handle.request_id, None)
        handle.push(update)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            handles, self._live, self._inbox = list(self._live.values()), {}, []
        for handle in handles:
            try:
                self.engine.abort(handle.request_id)
            except Exception:  # noqa: BLE001 - the engine may be in a bad state; the clients must still hear
                log.exception("abort failed")
            handle.push(Update(error=error))
