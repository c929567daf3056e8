"""POST /v1/score as a bare ASGI endpoint, called ahead of FastAPI's middleware and routing.

The stack around the scorer (FastAPI's exit-stack and error middleware, the metrics and
admission middleware, routing, Starlette's Request and Response) cost 28-35 µs of CPU per
request, measured in process with the scorer stubbed out (9-13 µs now); a shed request paid it
too.
Here a request goes: admission (a prebuilt 503 before the body is read; under uvicorn's
httptools protocol most sheds are answered even earlier, by server.py through `shed_early`)
-> the body (size and time bounded, 413/408/499) -> Scorer.score -> the reply, with every
ApiError answered as the app's exception handlers answer it, and the request metrics recorded
as MetricsMiddleware records them. The FastAPI route in routers/score.py stays for the
OpenAPI document.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ctrserve.service.admission import SHED_BODY, AdaptiveLimit
from ctrserve.service.errors import ApiError, BodyTimeout, BodyTooLarge, ClientClosed, error_body
from ctrserve.service.metrics import RequestRecorder

log = logging.getLogger("ctrserve.service")
PATH = "/v1/score"
ARRIVED = "ctrserve.arrived"  # scope key: time.monotonic() when the request began to arrive
INTERNAL = error_body([{"loc": [], "msg": "internal error", "type": "internal"}])


class ScoreEndpoint:
    def __init__(self, state: Any, recorder: RequestRecorder, limit: AdaptiveLimit | None):
        self.state, self.recorder, self.limit = state, recorder, limit
        metrics, settings = state.metrics, state.settings
        self.shed, self.gauge = metrics.shed.labels("admission"), metrics.admission_limit
        self.max_bytes, self.body_timeout_s = settings.max_body_bytes, settings.body_timeout_s
        retry = {"retry-after": str(settings.retry_after_s)}
        self.shed_start = start(503, SHED_BODY, retry)
        # a client waiting for 100-continue may never send the body that the connection's
        # parser would then wait for: its connection closes after the 503 (RFC 9110 10.1.1)
        self.shed_closing = start(503, SHED_BODY, {**retry, "connection": "close"})
        self.shed_raw = b"".join(b"%s: %s\r\n" % pair for pair in self.shed_start["headers"])
        self.shed_raw += b"\r\n" + SHED_BODY
        # the longest wait before the gate, and the pause before a shed connection is read
        # again (server.py)
        self.target_s = settings.admission_target_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        status = 500
        try:
            if self.limit is None:
                status = await self._answer(scope, receive, send)
            elif not self._admit(arrived := scope.get(ARRIVED) or time.monotonic()):
                self.shed.inc()
                status = 503
                await send(self.shed_closing if expects_continue(scope) else self.shed_start)
                await send({"type": "http.response.body", "body": SHED_BODY})
            else:
                status = await self._admitted(scope, receive, send, arrived)
        finally:
            self.recorder.record(PATH, status, time.perf_counter() - started)

    def shed_early(self, arrived: float) -> bytes | None:
        """For the HTTP protocol (server.py), once a request's headers are parsed: the raw
        tail of a 503 (headers after the status line, and the body) when the gate would shed
        it, counted as a shed; None when it would admit it, and then the app decides as
        before. Answered there, a shed costs no task, app call or response assembly."""
        if self.limit is None or (self._in_time(arrived) and not self.limit.full()):
            return None
        self.shed.inc()
        self.recorder.record(PATH, 503, 0.0)
        return self.shed_raw

    def _admit(self, arrived: float) -> bool:
        """Shed a request that already waited longer than the admission target before reaching
        the gate (a saturated event loop: the in-flight limit cannot see that queue), or one
        past the in-flight limit."""
        return self._in_time(arrived) and self.limit.try_acquire()

    def _in_time(self, arrived: float) -> bool:
        return time.monotonic() - arrived <= self.target_s

    async def _admitted(self, scope: dict, receive: Any, send: Any, arrived: float) -> int:
        try:
            return await self._answer(scope, receive, send)
        finally:  # the latency the limit steers by counts from arrival, waits included
            self.limit.release(time.monotonic() - arrived)
            self.gauge.set(self.limit.limit)

    async def _answer(self, scope: dict, receive: Any, send: Any) -> int:
        status, headers = 200, {}
        try:
            body = await read_body(scope, receive, self.max_bytes, self.body_timeout_s)
            reply = await self.state.scorer.score(body)
        except ApiError as exc:
            status, headers, reply = exc.status, exc.headers, error_body(exc.items())
        except Exception:  # as the app's handler: logged, and a JSON 500, never a page
            log.exception("unexpected error on %s", PATH)
            status, reply = 500, INTERNAL
        await send(start(status, reply, headers))
        await send({"type": "http.response.body", "body": reply})
        return status


def expects_continue(scope: dict) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue"
               for name, value in scope["headers"])


def start(status: int, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http.response.start", "status": status, "headers": raw}


async def read_body(scope: dict, receive: Any, limit: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` bytes (413), when it does
    not arrive within `timeout_s` (408), or when the client hangs up first (499)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge(["body"], f"body of {value.decode()} bytes exceeds {limit} bytes")
    if arrived_whole(receive):  # nothing to wait for: no timer (asyncio.timeout costs ~4 µs)
        return await _receive_body(receive, limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive_body(receive, limit)
    except TimeoutError:
        raise BodyTimeout(["body"], f"the body did not arrive within {timeout_s:g} s "
                          "(body_timeout_s)") from None


async def _receive_body(receive: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosed(["body"], "the client closed the connection before the body "
                               "arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(["body"], f"body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def arrived_whole(receive: Any) -> bool:
    """Whether uvicorn's request cycle behind `receive` (httptools, as server.py runs it)
    already holds the whole body, so that reading it cannot wait: the request's last bytes
    were parsed (more_body False, its event set). False for any other server or state."""
    cycle = getattr(receive, "__self__", None)
    try:
        return cycle.more_body is False and cycle.message_event.is_set()
    except AttributeError:
        return False
