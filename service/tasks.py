"""The scorer's background tasks, stopped at shutdown without ever hanging it."""

from __future__ import annotations

import asyncio
import logging

STOP_TIMEOUT_S = 5.0


async def stop_task(task: asyncio.Task | None, log: logging.Logger) -> None:
    """Cancel `task` and wait at most STOP_TIMEOUT_S for it to end.

    A cancellation can be lost inside a library call: Python 3.11's asyncio.timeout turns it
    into a TimeoutError when its own deadline falls due in the same loop turn, and a loop that
    retries on errors then runs on. Awaiting such a task would hold the lifespan's shutdown,
    and the process, forever: a replica once stayed alive after SIGTERM in CI, idle in this
    teardown, though the cause was not pinned down."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
    if not done:
        log.warning("%s did not stop within %.0f s of its cancellation; shutting down "
                    "without it", task.get_name(), STOP_TIMEOUT_S)
    elif not task.cancelled():
        task.exception()  # retrieved: an error at shutdown is not worth a second report
