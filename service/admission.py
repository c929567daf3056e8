"""Admission control: admit a score request or shed it before its body is read.

Past saturation, a request shed after parsing, feature reads and encoding costs most of a
request; goodput then collapses (issue 13: 23% of saturation at 2x offered load). The score
endpoint (service/score_endpoint.py) asks this limit first, on the raw ASGI scope, and answers
a prebuilt 503 with Retry-After without reading the body.

The limit on admitted requests in flight adapts to their measured latency, in the style of TCP
and Netflix's concurrency-limits (a latency target instead of packet loss): each admitted
request measures its time from admission to reply, averaged over the last ten or so; while
the average stays within `admission_target_ms` and at least half the limit is in use, each
answer raises the limit by half a request (up to x1.5 a round trip), and while it is above,
the limit shrinks by a tenth once per target interval. By Little's law the limit settles near
throughput x target, so admitted requests wait about the target, well inside the request
deadline, and the rest are shed at once instead of queueing. Nor does it admit more requests
than the batcher's queue holds (`queue_capacity_rows` over the average candidates per
request): those would be shed by the queue after their parsing and encoding.
The limit starts at `admission_initial`; `admission_min` keeps enough requests in flight for
batching, `admission_max` caps it.
"""

from __future__ import annotations

import time
from typing import Any

from ctrserve.service.errors import error_body

SHED_BODY = error_body([{"loc": ["admission"], "msg": "the scorer is at its admission limit; "
                         "retry after Retry-After", "type": "overloaded"}])


class AdaptiveLimit:
    """The in-flight limit: grows while answers are fast, shrinks when they are slow."""

    GROWTH = 0.5  # per fast answer while busy: up to x1.5 a round trip
    DECAY = 0.9  # per target interval with slow answers
    SMOOTHING = 0.1  # weight of one answer in the latency average

    def __init__(self, target_s: float, minimum: int, initial: int, maximum: int,
                 capacity_rows: float = float("inf"), clock: Any = time.monotonic):
        self.target_s, self.minimum, self.maximum, self.clock = target_s, minimum, maximum, clock
        self.limit = float(initial)
        self.inflight = 0
        self.latency_s = 0.0  # moving average of the admitted requests' latency
        self.capacity_rows = capacity_rows
        self.rows = 1.0  # moving average of the rows (candidates) per admitted request
        self._last_decrease = float("-inf")

    def full(self) -> bool:
        # never more in flight than the batcher's queue holds: past it, a request would be
        # shed by the queue after its parsing and encoding, the costly way
        return self.inflight >= min(self.limit,
                                    max(self.minimum, self.capacity_rows / self.rows)) // 1

    def try_acquire(self) -> bool:
        if self.full():
            return False
        self.inflight += 1
        return True

    def observe_rows(self, rows: int) -> None:
        self.rows += self.SMOOTHING * (rows - self.rows)

    def release(self, latency_s: float) -> None:
        # at least half the limit in use: the demand is there (as concurrency-limits' AIMD)
        busy = 2 * self.inflight >= self.limit
        self.inflight -= 1
        self.latency_s += self.SMOOTHING * (latency_s - self.latency_s)
        if self.latency_s > self.target_s:
            now = self.clock()
            if now - self._last_decrease >= self.target_s:
                self._last_decrease = now
                self.limit = max(float(self.minimum), self.limit * self.DECAY)
        elif busy:
            self.limit = min(float(self.maximum), self.limit + self.GROWTH)
