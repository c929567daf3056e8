"""The benchmarks' load client (loadtest/http_load.py) against small servers on loopback: every
request it sends is counted once, with its status, whatever the server does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from ctrserve.loadtest.http_load import content_length, run_load

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
CLOSING = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"


class Server(asyncio.Protocol):
    """Answers each request by its body: `ok` 200, `close` 503 and then closes the connection,
    `hold` never. Counts what it received."""

    received: list[bytes]

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            size = end + 4 + content_length(self.buffer[:end])
            if len(self.buffer) < size:
                return
            body, self.buffer = self.buffer[end + 4:size], self.buffer[size:]
            self.received.append(body)
            if body == b"ok":
                self.transport.write(OK)
            elif body == b"close":
                self.transport.write(CLOSING)
                self.transport.close()


@pytest.fixture
def server() -> Iterator[tuple[int, list[bytes]]]:
    """The server on its own event loop in a thread: (port, bodies received)."""
    loop, received, ready = asyncio.new_event_loop(), [], threading.Event()
    protocol = type("Counting", (Server,), {"received": received})
    port: list[int] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        listening = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0))
        port.append(listening.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()
        listening.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield port[0], received
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def request(body: bytes) -> bytes:
    return b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_open_loop_sends_every_due_request_once(server):
    port, received = server
    out = run_load("127.0.0.1", port, [request(b"ok")], rate=400, duration=0.5, connections=8)
    assert [status for status, _ in out.results] == [200] * 200
    assert len(received) == 200 and len(out.lags) == 200
    assert out.seconds == 0.5
    assert all(latency >= 0 for _, latency in out.results)


def test_unanswered_requests_time_out_and_closing_servers_are_reconnected(server):
    """`hold` requests count as status 0 after the timeout; the connection that a `close`
    reply ends is replaced, and nothing sent on it afterwards is lost."""
    port, received = server
    payloads = [request(b"ok"), request(b"close"), request(b"ok"), request(b"hold")]
    out = run_load("127.0.0.1", port, payloads, rate=200, duration=0.4, connections=64,
                   timeout_s=0.3)
    statuses = [status for status, _ in out.results]
    assert len(statuses) == 80 and len(received) == 80
    assert sorted(statuses) == sorted([200] * 40 + [503] * 20 + [0] * 20)
    held = [latency for status, latency in out.results if status == 0]
    assert min(held) >= 0.3


def test_closed_loop_keeps_each_connection_busy_and_none_that_the_server_closed(server):
    port, received = server
    payloads = [request(b"ok"), request(b"close")]
    out = run_load("127.0.0.1", port, payloads, rate=None, duration=0.3, connections=2)
    assert len(out.results) == len(received) > 40
    assert {status for status, _ in out.results} == {200, 503}
    assert out.lags == [] and out.seconds >= 0.3
