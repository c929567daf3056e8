"""Waiting in tests: poll a condition until it holds or its deadline passes (never a bare sleep
standing in for an event). The poll interval only spaces the checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 15,
               interval_s: float = 0.05) -> T:
    """The condition's first truthy value; an AssertionError naming `what` past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(interval_s)
    return value


def latest_when(fetch: Callable[[], T], ready: Callable[[T], bool], timeout_s: float = 15,
                interval_s: float = 0.1) -> T:
    """`fetch()` once `ready` holds for it, or its last value at the deadline (so that the
    caller's assertion shows what it got)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)
