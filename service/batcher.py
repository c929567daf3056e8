"""A dynamic batching queue per loaded model, after Triton's dynamic batcher.

Requests put their encoded rows in a bounded queue (in rows) and await a future. One worker
thread takes the oldest request, adds queued requests while the batch stays within
`batch_max_rows` (waiting up to `batch_max_delay_ms` after the first one's arrival for more),
runs onnxruntime (which releases the GIL, so the event loop keeps serving), and hands each
request its slice back on the event loop. A request is never split: one larger than the row
budget runs alone. Past `queue_capacity_rows` a submit raises Overloaded (503 + Retry-After);
a request whose deadline passed while queued is answered 504 without running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ctrserve.service.errors import DeadlineExceeded, Overloaded
from ctrserve.service.metrics import Metrics
from ctrserve.service.settings import Settings

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], np.ndarray]


class BatcherClosed(RuntimeError):
    """The model was swapped out after the request picked it; the caller retries."""


@dataclass(eq=False)
class Job:
    feeds: Feeds
    rows: int
    future: asyncio.Future
    deadline: float  # time.monotonic(), the clock of the event loop
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, run: Runner, label: str, settings: Settings, metrics: Metrics):
        self._run, self.label, self._metrics = run, label, metrics
        self._depth = metrics.queue_depth.labels(label)
        self._wait = metrics.queue_wait.labels(label)
        self._inference = metrics.inference.labels(label)
        self._batch_rows = metrics.batch_rows.labels(label)
        self._batch_requests = metrics.batch_requests.labels(label)
        self._batching = settings.batching
        self._max_rows = settings.batch_max_rows
        self._max_delay = settings.batch_max_delay_ms / 1000
        self._capacity = settings.queue_capacity_rows
        metrics.queue_capacity.labels(label).set(self._capacity)
        self._retry_after = str(settings.retry_after_s)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name=f"batcher-{label}", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    # ---- event loop side ---------------------------------------------------------------
    def submit(self, feeds: Feeds, rows: int, deadline: float) -> asyncio.Future:
        """Queue rows for inference; the future resolves to their probabilities."""
        future = self._loop.create_future()
        with self._cond:
            if self._closed:
                raise BatcherClosed(self.label)
            if self.queued_rows + rows > self._capacity:
                self._metrics.shed.labels("overload").inc()
                raise Overloaded(["queue"], f"{self.queued_rows} rows queued, capacity "
                                 f"{self._capacity}; retry later",
                                 {"Retry-After": self._retry_after})
            self._queue.append(Job(feeds, rows, future, deadline))
            self.queued_rows += rows
            self._cond.notify()
        self._depth.set(self.queued_rows)
        return future

    async def close(self, timeout: float) -> bool:
        """Stop taking requests, finish the queued ones; True if the worker ended in time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout)
        return not self._thread.is_alive()

    def _deliver(self, jobs: list[Job], probs: np.ndarray | None, error: Exception | None,
                 expired: list[Job]) -> None:
        offset = 0
        for job in jobs:
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(probs[offset:offset + job.rows])
            offset += job.rows
        for job in expired:
            if not job.future.done():
                job.future.set_exception(DeadlineExceeded(["deadline"], "request deadline "
                                                          "passed while queued"))

    # ---- worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while (batch := self._take()) is not None:
            self._process(batch)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            if self._batching:
                rows = self._fill(batch, rows)
            self.queued_rows -= rows
        self._depth.set(self.queued_rows)
        return batch

    def _fill(self, batch: list[Job], rows: int) -> int:
        """Add queued jobs within the row budget, waiting up to the delay (lock held)."""
        until = batch[0].enqueued + self._max_delay
        while True:
            while self._queue and rows + self._queue[0].rows <= self._max_rows:
                job = self._queue.popleft()
                batch.append(job)
                rows += job.rows
            full = rows >= self._max_rows or bool(self._queue)
            remaining = until - time.monotonic()
            if full or self._closed or remaining <= 0:
                return rows
            self._cond.wait(remaining)

    def _process(self, batch: list[Job]) -> None:
        now = time.monotonic()
        # a done future was answered already (deadline timer, cancelled): skip its rows
        live = [j for j in batch if not j.future.done() and j.deadline > now]
        expired = [j for j in batch if not j.future.done() and j.deadline <= now]
        if expired:
            self._metrics.shed.labels("deadline").inc(len(expired))
        probs, error = None, None
        if live:
            probs, error = self._infer(live, now)
        self._loop.call_soon_threadsafe(self._deliver, live, probs, error, expired)

    def _infer(self, jobs: list[Job], now: float) -> tuple[np.ndarray | None, Exception | None]:
        for job in jobs:
            self._wait.observe(now - job.enqueued)
        feeds = jobs[0].feeds if len(jobs) == 1 else {
            name: np.concatenate([j.feeds[name] for j in jobs]) for name in jobs[0].feeds}
        rows = sum(j.rows for j in jobs)
        started = time.perf_counter()
        try:
            probs = self._run(feeds)
        except Exception as exc:  # answered as 500 by the caller, never kills the worker
            return None, exc
        self._inference.observe(time.perf_counter() - started)
        self._batch_rows.observe(rows)
        self._batch_requests.observe(len(jobs))
        return probs, None
