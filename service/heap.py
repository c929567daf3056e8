"""The garbage collector in a serving process: the built heap frozen, young collections rarer.

A scorer's heap is mostly what start-up built (the app, the bundles' encoders and item caches):
about 150,000 objects that live as long as the process, while its requests make almost no
reference cycles (in an overload run the collector found about 4,000 cyclic objects in 30 s,
out of millions allocated). With CPython's defaults (a young collection every 700 allocations,
a full one whenever the survivors grow by a quarter) the collector walked that heap again and
again: 9% of the scorer's CPU at 9,000 requests/s offered (perf), and full collections of
60-70 ms that stall the event loop. So while a process serves (`managed`, around
server.serve's run) its heap is frozen once it is built and again after each model change
(`settle`): frozen objects are not walked, and reference counting frees them as before. Cycles
among them (a retired model's) are found by the next settle, which unfreezes first; young
collections run every YOUNG allocations. In-process apps (the tests, the benchmarks' ASGI
calls) are left as they are.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("ctrserve.service")
YOUNG = 7000  # allocations between young collections; CPython's default is 700
_managed = False


@contextmanager
def managed() -> Iterator[None]:
    """While this process serves: `settle` freezes its heap, and young collections are rarer.
    Undone after (a test that runs `ctrserve serve` in its own process gets its collector
    back as it was)."""
    global _managed
    before = gc.get_threshold()
    _managed = True
    gc.set_threshold(YOUNG, 10, 10)
    try:
        yield
    finally:
        _managed = False
        gc.set_threshold(*before)
        gc.unfreeze()


def settle() -> int:
    """In a managed process: collect everything (a frozen heap too), then freeze what is left.
    One full collection, tens of milliseconds on the event loop: at start-up and after a model
    change only. Returns the number of frozen objects (0 when not managed)."""
    if not _managed:
        return 0
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("heap settled: %d objects frozen in %.0f ms", frozen,
             (time.perf_counter() - started) * 1000)
    return frozen


def resettle() -> int | None:
    """After a model change: settle again if the heap was settled (a serving process past its
    start-up); else None, and nothing is done."""
    return settle() if gc.get_freeze_count() else None
