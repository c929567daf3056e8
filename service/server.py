"""Run the scorer under uvicorn (one worker: uvloop + httptools, no access log).

Every wait of a connection is bounded: headers within `header_timeout_s` (uvicorn has no such
timeout: a client sending a byte a minute would hold a connection forever), the body within
`body_timeout_s` (routers/score.py), idle keep-alive connections 5 s (uvicorn's own), and at
most `max_connections` connections or requests at once (uvicorn's limit_concurrency: 503).
A score request that the admission gate sheds is answered by the protocol itself as soon as
its headers are parsed (HeaderTimeout._shed_early): no task, app call or response assembly;
the rest of its body, skipped, has `body_timeout_s` to arrive too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ctrserve.service import heap
from ctrserve.service.app import create_app
from ctrserve.service.score_endpoint import ARRIVED
from ctrserve.service.settings import Settings


class HeaderTimeout(HttpToolsProtocol):
    """httptools' protocol that closes a connection whose request headers are not complete
    `header_timeout_s` after it opened, or after its next request began."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _held_until = 0.0  # loop time until which a shed connection's bytes are held
    _held: list[bytes] | None = None
    _shed_body_timeout_s: float | None = None  # set while a shed request's body is to come

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # when the request's first bytes were parsed: the admission gate counts a request's
        # wait from here, as a saturated event loop queues requests before the app sees them
        self.scope[ARRIVED] = time.monotonic()  # type: ignore[literal-required]
        if self._header_timer is None:
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        if not self._shed_early():
            super().on_headers_complete()

    def _shed_early(self) -> bool:
        """A score request that the admission gate sheds is answered here, the 503 written
        whole; its body, still to be parsed, is then ignored as uvicorn ignores the rest of
        a request whose response is complete. Only on an idle connection (no pipelined
        request before it) and without Expect: 100-continue (the app closes that one)."""
        endpoint = getattr(self.app, "score_endpoint", None)
        if (endpoint is None or self.url != b"/v1/score" or self.parser.get_method() != b"POST"
                or self.expect_100_continue
                or not (self.cycle is None or self.cycle.response_complete)):
            return False
        tail = endpoint.shed_early(self.scope[ARRIVED])  # type: ignore[literal-required]
        if tail is None:
            return False
        head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            head.append(b"connection: close\r\n")
        self.cycle = ANSWERED  # type: ignore[assignment]
        self.transport.write(b"".join(head) + tail)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
        if keep_alive:
            self._hold_reads(endpoint.target_s)
            self._shed_body_timeout_s = endpoint.body_timeout_s
        return True

    def on_message_complete(self) -> None:
        if self._shed_body_timeout_s is not None:  # the shed request's body ended: no bound
            self._shed_body_timeout_s = None
            self._stop_header_timer()
        super().on_message_complete()

    def _hold_reads(self, seconds: float) -> None:
        """After a shed, what the connection sends within `seconds` is parsed only then: a
        client that retries at once, Retry-After notwithstanding, is shed once per connection
        per `seconds` instead of taking the CPU of the admitted requests (a closed loop of 64
        such connections at 500 candidates answered 143 requests/s against 189 at 16). A
        client that waits costs nothing more: reads are paused only when bytes come early."""
        self._held_until = self.loop.time() + seconds

    def data_received(self, data: bytes) -> None:
        if self._shed_body_timeout_s is not None and self._header_timer is None:
            # a shed request's body comes apart from its headers: it has body_timeout_s, as
            # an admitted one has, or a client trickling it would hold the connection (each
            # byte cancels uvicorn's keep-alive timer)
            self._start_header_timer(self._shed_body_timeout_s)
        if self._held is None and self.loop.time() >= self._held_until:
            super().data_received(data)
            return
        if self._held is None:
            self._held = []
            self.flow.pause_reading()
            self.loop.call_at(self._held_until, self._release_held)
        self._held.append(data)

    def _release_held(self) -> None:
        data, self._held = b"".join(self._held or ()), None
        if not self.transport.is_closing():
            self.flow.resume_reading()
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self, seconds: float | None = None) -> None:
        self._header_timer = self.loop.call_later(seconds or self.header_timeout_s,
                                                  self._too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _NoReader:
    """uvicorn's connection_lost wakes whoever reads the cycle's body: nobody, here."""

    def set(self) -> None:
        pass


class _Answered:
    """Stands for the cycle of a request answered by the protocol itself: complete."""

    response_complete = True
    message_event = _NoReader()


ANSWERED = _Answered()


def uvicorn_config(settings: Settings, log_level: str = "info") -> uvicorn.Config:
    fast_loop = importlib.util.find_spec("uvloop") is not None
    http: type | str = "h11"
    if importlib.util.find_spec("httptools") is not None:
        http = type("BoundedHttpTools", (HeaderTimeout,),
                    {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port,
        loop="uvloop" if fast_loop else "asyncio", http=http,
        access_log=False, proxy_headers=False, log_level=log_level, lifespan="on",
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, /readyz turns 503 at once while requests are still served
    for `shutdown_delay_s`, so that a proxy's health check takes the replica out of rotation
    before it stops accepting; only then does uvicorn's graceful shutdown begin. Without the
    delay, connections already queued in the listen backlog are reset and the proxy answers
    502 for requests it had already sent (tests/test_proxy.py)."""

    def __init__(self, config: uvicorn.Config, delay_s: float):
        super().__init__(config)
        self.delay_s, self.draining = delay_s, False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.delay_s > 0 and self.started and not self.draining:
            self.draining = True
            self.config.app.state.ready = False
            timer = threading.Timer(self.delay_s, super().handle_exit, args=(sig, frame))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then finish in-flight requests and drain the queues."""
    server = DrainingServer(uvicorn_config(settings), settings.shutdown_delay_s)
    with heap.managed():
        server.run(sockets=[sock] if sock else None)
    if server.started is False:
        raise SystemExit(3)  # start-up failed; uvicorn has logged why
