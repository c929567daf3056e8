"""Stopping a background task at shutdown never hangs, even when the task loses its
cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ctrserve.service import tasks


def test_a_task_that_loses_its_cancellation_does_not_hold_the_shutdown(monkeypatch, caplog):
    monkeypatch.setattr(tasks, "STOP_TIMEOUT_S", 0.2)
    swallow = [True]

    async def stubborn(started: asyncio.Event, never: asyncio.Event) -> None:
        started.set()
        while True:
            try:
                await never.wait()
            except asyncio.CancelledError:
                if not swallow[0]:
                    raise

    async def main() -> None:
        started, never = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(stubborn(started, never), name="stubborn")
        await started.wait()
        await asyncio.wait_for(tasks.stop_task(task, logging.getLogger("t")), 5)
        assert not task.done()
        swallow[0] = False
        await tasks.stop_task(task, logging.getLogger("t"))
        assert task.cancelled()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "stubborn did not stop" in caplog.text


@pytest.mark.parametrize("fails", [False, True])
def test_a_task_that_ends_is_waited_for(fails):
    async def worker(started: asyncio.Event, never: asyncio.Event) -> None:
        started.set()
        if fails:
            raise RuntimeError("boom")
        await never.wait()

    async def main() -> asyncio.Task:
        started, never = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker(started, never))
        await started.wait()
        await tasks.stop_task(task, logging.getLogger("t"))
        return task

    task = asyncio.run(main())
    assert task.done() and task.cancelled() != fails
