"""Prometheus metrics of the long-running drainer (`ctrserve drain-events --follow`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ctrserve.common.keys import LOG_KINDS


class DrainerMetrics:
    """Counted always; served on `port` when one is given."""

    def __init__(self, port: int | None):
        r = self.registry = CollectorRegistry()
        self.moved = Counter("ctrserve_drain_entries", "log entries moved to Parquet", ["log"],
                             registry=r)
        self.dead = Counter("ctrserve_drain_dead_letters", "log entries that could not be "
                            "drained (written to OUT/dead-letter/)", registry=r)
        self.left = Gauge("ctrserve_drain_left_entries", "entries left in the streams after "
                          "the last pass", ["log"], registry=r)
        for kind in LOG_KINDS:
            self.moved.labels(kind)
            self.left.labels(kind)
        if port is not None:
            start_http_server(port, registry=r)

    def observe(self, result: dict[str, Any]) -> None:
        self.moved.labels("events").inc(result["events"])
        self.moved.labels("serve").inc(result["served"])
        self.dead.inc(result["dead_letters"])
        for kind, n in result["left"].items():
            self.left.labels(kind).set(n)
