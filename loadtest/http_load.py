"""A lean HTTP/1.1 load client for the benchmarks: keep-alive connections on asyncio protocols
(uvloop when installed), one request in flight per connection, closed or open loop.

Open loop (wrk2's way): request i is due at i / rate whatever the replies, and its latency
counts from that due time, so a server that stalls is not hidden by a client that waits for
it (coordinated omission). A due request goes out on a free connection, or waits for the
next one to free up (its wait is the send lag). Closed loop: each connection sends its next
request as soon as its reply is in.

What the client can offer bounds what a cell measures. `python -m ctrserve.loadtest.http_load
--self-test` drives an echo server on plain protocols in a second process, each pinned to its
own core: 2,000 to 20,000 requests/s all sent on time (send lag p99 1.3-1.7 ms, the tick) at
68 to 16 µs of client CPU per request (2026-12-02, 2-core VM). The streams client it replaces
(asyncio.open_connection, a wait_for task per request), interleaved with it against the same
server, kept up as well but at 39-54 µs per request against 17-32 µs at 4,000-12,000/s: on a
small machine the client takes that CPU from the scorer. Connections, not CPU, were that
client's bound at 10 candidates (bench_overload's default of 512 now grows with the rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

TICK_S = 0.001  # open loop: requests due within a tick go out together (uvloop: ms timers)
SWEEP_S = 0.05  # how often requests past the timeout are looked for
OPEN_AT_ONCE = 128  # connects in flight at once: more overflow the listen backlog (SYN retries)


@dataclass
class LoadResult:
    results: list[tuple[int, float]] = field(default_factory=list)  # (status, latency s); 0: none
    lags: list[float] = field(default_factory=list)  # open loop: due time to sending
    seconds: float = 0.0


def content_length(head: bytes) -> int:
    """The Content-Length of an HTTP/1.1 head (start line and headers), 0 when absent."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class _Connection(asyncio.Protocol):
    """One keep-alive connection; reports each complete reply to its load."""

    def __init__(self, load: _Load):
        self.load, self.transport = load, None
        self.buffer, self.need, self.status, self.last = b"", 0, 0, False
        self.due: float | None = None  # the request in flight: its due time

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, payload: bytes, due: float) -> None:
        self.due = due
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.need:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            self.status = int(head[9:12])
            self.need = end + 4 + content_length(head)
            self.last = b"\r\nconnection: close" in head.lower()
        if len(self.buffer) >= self.need and self.due is not None:
            self.buffer, self.need = self.buffer[self.need:], 0
            due, self.due = self.due, None
            self.load.answered(self, self.status, due, reuse=not self.last)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)


class _Load:
    def __init__(self, host: str, port: int, payloads: list[bytes], timeout_s: float):
        self.host, self.port, self.payloads, self.timeout_s = host, port, payloads, timeout_s
        self.out = LoadResult()
        self.free: deque[_Connection] = deque()
        self.busy: set[_Connection] = set()
        self.backlog: deque[tuple[float, bytes]] = deque()  # open loop: due, not yet sent
        self.closed_until: float | None = None  # closed loop: send again until then
        self.closing = False
        self.sent = 0
        self._reopening: set[asyncio.Task] = set()

    async def open(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for start in range(0, n, OPEN_AT_ONCE):
            made = await asyncio.gather(*(loop.create_connection(
                lambda: _Connection(self), self.host, self.port)
                for _ in range(min(OPEN_AT_ONCE, n - start))))
            self.free.extend(protocol for _, protocol in made)

    def _next_payload(self) -> bytes:
        self.sent += 1
        return self.payloads[(self.sent - 1) % len(self.payloads)]

    def submit(self, due: float) -> None:
        payload = self._next_payload()
        if self.free:
            self._send(self.free.popleft(), due, payload)
        else:
            self.backlog.append((due, payload))

    def _send(self, conn: _Connection, due: float, payload: bytes) -> None:
        if self.closed_until is None:
            self.out.lags.append(time.perf_counter() - due)
        self.busy.add(conn)
        conn.send(payload, due)

    def _reuse(self, conn: _Connection, now: float) -> None:
        """A connection with nothing in flight: the oldest waiting request, the next one of
        the closed loop, or back to the free ones."""
        if self.backlog:
            self._send(conn, *self.backlog.popleft())
        elif self.closed_until is not None and now < self.closed_until:
            self._send(conn, now, self._next_payload())
        else:
            self.free.append(conn)

    def answered(self, conn: _Connection, status: int, due: float, reuse: bool) -> None:
        """A complete reply; a connection that the server closes after it is not reused (its
        replacement is opened when it is lost)."""
        now = time.perf_counter()
        self.out.results.append((status, now - due))
        self.busy.discard(conn)
        if reuse:
            self._reuse(conn, now)

    def lost(self, conn: _Connection) -> None:
        """A connection closed by the server or by a timeout: its request failed (status 0),
        and a new connection takes its place."""
        if conn.due is not None:
            self.out.results.append((0, time.perf_counter() - conn.due))
            conn.due = None
        self.busy.discard(conn)
        if conn in self.free:
            self.free.remove(conn)
        if not self.closing:
            task = asyncio.ensure_future(self._reopen())
            self._reopening.add(task)
            task.add_done_callback(self._reopening.discard)

    async def _reopen(self) -> None:
        try:
            await self.open(1)
        except OSError:
            return
        self._reuse(self.free.pop(), time.perf_counter())

    def expire(self) -> None:
        """Requests past the timeout: those in flight lose their connection, those never sent
        (every connection busy) count as failed too."""
        now = time.perf_counter()
        limit = now - self.timeout_s
        for conn in [c for c in self.busy if c.due is not None and c.due < limit]:
            conn.transport.abort()
        while self.backlog and self.backlog[0][0] < limit:
            due, _ = self.backlog.popleft()
            self.out.results.append((0, now - due))

    @property
    def pending(self) -> int:
        return len(self.busy) + len(self.backlog)

    def close(self) -> None:
        self.closing = True
        now = time.perf_counter()
        for due, _ in self.backlog:
            self.out.results.append((0, now - due))
        for conn in [*self.free, *self.busy]:
            if conn.due is not None:
                self.out.results.append((0, now - conn.due))
                conn.due = None
            conn.transport.close()


async def _run(host: str, port: int, payloads: list[bytes], rate: float | None,
               duration: float, connections: int, timeout_s: float) -> LoadResult:
    load = _Load(host, port, payloads, timeout_s)
    await load.open(connections)
    started = time.perf_counter()
    if rate is None:
        await _closed_loop(load, started + duration, connections)
    else:
        await _open_loop(load, started, rate, duration)
    end = started + duration + timeout_s
    while load.pending and time.perf_counter() < end:
        load.expire()
        await asyncio.sleep(0.005)
    load.out.seconds = duration if rate else time.perf_counter() - started
    load.close()
    return load.out


async def _closed_loop(load: _Load, until: float, connections: int) -> None:
    """A request on every connection; each reply sends the next one until `until`."""
    load.closed_until = until
    for _ in range(connections):
        load.submit(time.perf_counter())
    while (left := until - time.perf_counter()) > 0:
        await asyncio.sleep(min(left, SWEEP_S))
        load.expire()


async def _open_loop(load: _Load, started: float, rate: float, duration: float) -> None:
    """Request j is due at started + j / rate; each tick submits those that fell due."""
    total, i, swept = int(rate * duration), 0, started
    while i < total:
        now = time.perf_counter()
        due_now = min(total, int((now - started) * rate) + 1)
        for j in range(i, due_now):
            load.submit(started + j / rate)
        i = due_now
        if now - swept > SWEEP_S:
            load.expire()
            swept = now
        await asyncio.sleep(TICK_S)


def run_load(host: str, port: int, payloads: list[bytes], rate: float | None, duration: float,
             connections: int, timeout_s: float = 10.0) -> LoadResult:
    """Drive host:port with `payloads` (raw HTTP/1.1 requests, in turn) for `duration` s: open
    loop at `rate` requests/s, or closed loop (rate None) on every connection. A request not
    answered within `timeout_s` of its due time counts as status 0, as does one whose
    connection broke."""
    return _event_loop(lambda: _run(host, port, payloads, rate, duration, connections,
                                    timeout_s))


def _event_loop(main: Callable[[], Awaitable[LoadResult]]) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


# ---- self-test: what the client itself can offer -------------------------------------------------
REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class _Echo(asyncio.Protocol):
    """A server that answers every complete request (headers and Content-Length body) with
    REPLY: far cheaper than the client, so the client's rate is what is measured."""

    def connection_made(self, transport: Any) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = content_length(self.buffer[:end])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(REPLY)


def _serve(port_to: Any, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, [cpu])

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0,
                                                                backlog=4096)
        port_to.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    _event_loop(main)  # type: ignore[arg-type]


def self_test(rates: list[float], duration: float, connections: int) -> list[dict[str, Any]]:
    """Open loop against the echo server in another process (each pinned to its own core when
    the machine has two): the sent rate, the send lag and the client's CPU per request."""
    import multiprocessing

    two = (os.cpu_count() or 1) >= 2
    port_from, port_to = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=_serve, args=(port_to, 1 if two else None),
                                     daemon=True)
    server.start()
    try:
        if not port_from.poll(30):
            raise SystemExit("the echo server did not start within 30 s")
        port = port_from.recv()
        if two:
            os.sched_setaffinity(0, [0])
        payload = (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"
                   + b"x" * 60)
        rows = []
        for rate in rates:
            cpu = time.process_time()
            out = run_load("127.0.0.1", port, [payload], rate, duration, connections)
            used = time.process_time() - cpu
            ok = sum(1 for status, _ in out.results if status == 200)
            lags = sorted(out.lags)
            rows.append({"rate": rate, "answered_per_s": round(ok / duration),
                         "send_lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2),
                         "client_us_per_request": round(1e6 * used / max(ok, 1), 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return rows
    finally:
        server.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.http_load",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", required=True,
                   help="measure the client against an echo server")
    p.add_argument("--rates", default="2000,5000,10000,15000,20000")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=512)
    p.add_argument("--out", default="bench-out/http_load.json")
    a = p.parse_args(argv)
    rows = self_test([float(r) for r in a.rates.split(",")], a.duration, a.connections)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"cells": rows, "cores": os.cpu_count(),
                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f,
                  indent=1)
    print(f"{'rate':>8} {'answered/s':>11} {'lag p99 ms':>11} {'client µs/req':>14}")
    for r in rows:
        print(f"{r['rate']:>8.0f} {r['answered_per_s']:>11} {r['send_lag_p99_ms']:>11} "
              f"{r['client_us_per_request']:>14}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
