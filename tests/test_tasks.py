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

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if not swallow[0]:
                    raise

    async def main() -> None:
        task = asyncio.create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0)
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
    async def worker() -> None:
        await asyncio.sleep(30)

    async def failing() -> None:
        raise RuntimeError("boom")

    async def main() -> asyncio.Task:
        task = asyncio.create_task(failing() if fails else worker())
        await asyncio.sleep(0)
        await tasks.stop_task(task, logging.getLogger("t"))
        return task

    task = asyncio.run(main())
    assert task.done()
