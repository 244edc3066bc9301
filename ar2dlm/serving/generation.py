"""Running one accepted request: submit it to the worker, then answer it whole or as a stream of SSE chunks.

Every request has a deadline (`--request-timeout`, counted from its arrival): past it the request is cancelled in
the engine and the client gets an OpenAI error (a 408, or an `error` event inside a stream that already began).
A client that goes away is noticed (a stream: Starlette cancels the generator; a whole response: a task waits for
the disconnect message) and its request is cancelled, which frees its cache row before the engine's next forward.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from ar2dlm.errors import Ar2dlmError
from ar2dlm.serving.errors import ApiError, invalid
from ar2dlm.serving.responses import DONE, Reply, sse
from ar2dlm.serving.schemas import Job
from ar2dlm.serving.worker import EngineWorker, QueueFull, Update, WorkerStopped


class ClientGone(Exception):
    pass


class Generation:
    """One request from submission to its last byte."""

    def __init__(self, job: Job, worker: EngineWorker, settings, metrics, arrived: float):
        self.job, self.worker, self.metrics = job, worker, metrics
        self.reply = Reply(job, settings.model_name)
        self.timeout_s = settings.request_timeout_s
        self.deadline = arrived + settings.request_timeout_s
        self.handle = self._submit(settings.retry_after_s)
        self.done = False

    def _submit(self, retry_after_s: int):
        try:
            return self.worker.submit(self.job.prompt_ids, self.job.params)
        except QueueFull:
            raise ApiError(429, f"the server is at capacity ({self.worker.capacity} requests running or "
                                "waiting): retry later", code="queue_full",
                           headers={"Retry-After": str(retry_after_s)}) from None
        except WorkerStopped:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None

    # ------------------------------------------------------------------------------------------ answers
    async def respond(self, request: Request):
        if self.job.stream:
            return StreamingResponse(self._events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await self._collect(request)
        finally:
            self._cancel_unless_done("disconnect")
        return JSONResponse(self.reply.body(result))

    async def _collect(self, request: Request):
        gone = asyncio.create_task(_disconnected(request))
        try:
            while True:
                update = await self._next(gone)
                if update.result is not None:
                    self.done = True
                    return update.result
        finally:
            gone.cancel()

    async def _events(self):
        try:
            if self.job.kind == "chat":
                yield self.reply.first_chunk()
            while True:
                try:
                    update = await self._next(None)
                except ApiError as e:  # the stream has begun: the error travels as an event (OpenAI's clients
                    yield sse(e.body())  # raise it as an APIError)
                    break
                if update.delta or update.new_tokens:
                    yield self.reply.update_chunk(update)
                if update.result is not None:
                    self.done = True
                    for chunk in self.reply.final_chunks(update.result):
                        yield chunk
                    break
            yield DONE
        finally:  # also when Starlette cancels the stream because the client went away
            self._cancel_unless_done("disconnect")

    # ------------------------------------------------------------------------------------------ waiting
    async def _next(self, gone: asyncio.Task | None) -> Update:
        """The next update, or ApiError at the deadline / on a refused request, or ClientGone."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._deadline_error()
        getter = asyncio.ensure_future(self.handle.next(None))
        waits = {getter} if gone is None else {getter, gone}
        done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            if gone is not None and gone in done:
                raise ClientGone()
            raise self._deadline_error()
        update = getter.result()
        if update.error is not None:
            self.done = True  # the worker already dropped it
            raise _engine_error(update.error)
        return update

    def _deadline_error(self) -> ApiError:
        self._cancel_unless_done("deadline")
        return ApiError(408, f"the request did not finish within the server's deadline of {self.timeout_s:g} s "
                             "(--request-timeout); its decoding was cancelled", code="deadline_exceeded",
                        headers={"x-should-retry": "false"})  # the same request would take as long again

    def _cancel_unless_done(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.worker.cancel(self.handle.request_id)
            self.metrics.cancelled.labels(reason=reason).inc()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (after the body, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(error: Exception) -> ApiError:
    if isinstance(error, Ar2dlmError):  # the engine refused the prompt or parameters
        return invalid(str(error))
    if isinstance(error, WorkerStopped):
        return ApiError(503, "the server is shutting down", code="shutting_down")
    return ApiError(500, f"decoding failed: {type(error).__name__}: {error}", code="internal_error")
