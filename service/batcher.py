"""A dynamic batching queue per loaded model, after Triton's dynamic batcher.

Requests put their encoded rows in a bounded queue (in rows) and await a future. One worker
thread takes the oldest request, adds queued requests while the batch stays within
`batch_max_rows` (waiting up to `batch_max_delay_ms` after the first one's arrival for more),
runs onnxruntime (which releases the GIL, so the event loop keeps serving), and hands each
request its slice back on the event loop. A request is never split: one larger than the row
budget runs alone. Past `queue_capacity_rows` a submit raises Overloaded (503 + Retry-After);
a request whose deadline passed while queued is answered 504 without running.

Where inference runs (`inference_thread`): on the worker thread, the event loop parses and
encodes the next requests while onnxruntime runs, so one process uses more than one core; but
every batch crosses threads twice (a condition wake-up one way, the loop's self-pipe the other)
and both threads contend for the GIL around it, which measured 0.06-0.5 ms of CPU per request
(bench_request_cpu, docs/operations.md). Inline, the loop itself runs each batch, as a
callback scheduled when the first request of an empty queue arrives: the requests parsed in the
same loop turn, and those that arrived while the previous batch ran, go together. No thread,
no hand-off; the process uses one core, and `--workers` uses the others.
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
        self._inference_cpu = metrics.inference_cpu.labels(label)
        self._batch_rows = metrics.batch_rows.labels(label)
        self._batch_requests = metrics.batch_requests.labels(label)
        self._batching = settings.batching
        self._max_rows = settings.batch_max_rows
        self._max_delay = settings.batch_max_delay_ms / 1000
        self._capacity = settings.queue_capacity_rows
        metrics.queue_capacity.labels(label).set(self._capacity)
        self._retry_after = str(settings.retry_after_s)
        self.inline = not settings.inference_on_thread
        self._next_run: asyncio.Handle | None = None  # inline: the queue's next run
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name=f"batcher-{label}", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.inline:
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
            if not self.inline:
                self._cond.notify()
        if self.inline and (self._next_run is None or self.queued_rows >= self._max_rows):
            self._run_soon()  # a full batch runs now, not after a pending batching delay
        self._depth.set(self.queued_rows)
        return future

    def _run_soon(self) -> None:
        if self._next_run is not None:
            self._next_run.cancel()
        self._next_run = self._loop.call_soon(self._run_inline)

    def _run_inline(self) -> None:
        """One batch on the event loop; the next one in a later turn, after the loop has read
        what arrived meanwhile."""
        self._next_run = None
        with self._cond:
            if not self._queue:
                return
            wait = self._batching and self._max_delay > 0 and not self._closed and \
                self.queued_rows < self._max_rows
            remaining = self._queue[0].enqueued + self._max_delay - time.monotonic()
            if wait and remaining > 0:  # the first request waits up to the delay for company
                self._next_run = self._loop.call_later(remaining, self._run_inline)
                return
            batch = self._pop()
        self._depth.set(self.queued_rows)
        live, probs, error, expired = self._process(batch)
        self._deliver(live, probs, error, expired)
        if self._queue and self._next_run is None:
            self._run_soon()

    async def close(self, timeout: float) -> bool:
        """Stop taking requests, finish the queued ones; True if the worker ended in time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        while self.inline and self._queue:  # inline: the queued requests run now
            self._run_inline()
        if self._next_run is not None:
            self._next_run.cancel()
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
            self._loop.call_soon_threadsafe(self._deliver, *self._process(batch))

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            if self._batching:
                self._fill(self._queue[0].enqueued)
            batch = self._pop()
        self._depth.set(self.queued_rows)
        return batch

    def _pop(self) -> list[Job]:
        """The oldest job, and the next ones within the row budget when batching (lock held)."""
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while self._batching and self._queue and rows + self._queue[0].rows <= self._max_rows:
            batch.append(self._queue.popleft())
            rows += batch[-1].rows
        self.queued_rows -= rows
        return batch

    def _fill(self, first_enqueued: float) -> None:
        """Wait, up to the delay after the first job's arrival, until the queue holds a full
        batch (lock held)."""
        until = first_enqueued + self._max_delay
        while self.queued_rows < self._max_rows and not self._closed:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _process(self, batch: list[Job]) -> tuple[list[Job], np.ndarray | None,
                                                  Exception | None, list[Job]]:
        now = time.monotonic()
        # a done future was answered already (deadline timer, cancelled): skip its rows
        live = [j for j in batch if not j.future.done() and j.deadline > now]
        expired = [j for j in batch if not j.future.done() and j.deadline <= now]
        if expired:
            self._metrics.shed.labels("deadline").inc(len(expired))
        probs, error = None, None
        if live:
            probs, error = self._infer(live, now)
        return live, probs, error, expired

    def _infer(self, jobs: list[Job], now: float) -> tuple[np.ndarray | None, Exception | None]:
        for job in jobs:
            self._wait.observe(now - job.enqueued)
        feeds = jobs[0].feeds if len(jobs) == 1 else {
            name: np.concatenate([j.feeds[name] for j in jobs]) for name in jobs[0].feeds}
        rows = sum(j.rows for j in jobs)
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            probs = self._run(feeds)
        except Exception as exc:  # answered as 500 by the caller, never kills the worker
            return None, exc
        self._inference.observe(time.perf_counter() - started)
        self._inference_cpu.inc(time.thread_time() - cpu)  # one intra-op thread: this one's
        self._batch_rows.observe(rows)
        self._batch_requests.observe(len(jobs))
        return probs, None
