"""The garbage collector in a serving process: the built heap frozen, young collections rarer.

A scorer's heap is mostly what start-up built (the app, the bundles' encoders and item caches):
about 150,000 objects that live as long as the process, while its requests make almost no
reference cycles (in an overload run the collector found about 4,000 cyclic objects in 30 s,
out of millions allocated). With CPython's defaults (a young collection every 700 allocations,
a full one whenever the survivors grow by a quarter) the collector walked that heap again and
again: 9% of the scorer's CPU at 9,000 requests/s offered (perf), and full collections of
60-70 ms that stall the event loop. So a serving process (`manage`, from server.serve) freezes
its heap once it is built and again after each model change (`settle`): frozen objects are not
walked, and reference counting frees them as before. Cycles among them (a retired model's) are
found by the next settle, which unfreezes first; young collections run every YOUNG
allocations. In-process apps (the tests, the benchmarks' ASGI calls) are left as they are.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("ctrserve.service")
YOUNG = 7000  # allocations between young collections; CPython's default is 700
_managed = False


def manage() -> None:
    """This process serves: from now on `settle` freezes its heap, and young collections are
    rarer."""
    global _managed
    _managed = True
    gc.set_threshold(YOUNG, 10, 10)


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
