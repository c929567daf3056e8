"""Prometheus metrics of the scorer, in a registry per app (tests build several apps).

With several worker processes (`ctrserve serve --workers N`, service/server.py) the parent sets
PROMETHEUS_MULTIPROC_DIR before the workers start: every value then lives in a file per
process, and /metrics, whichever worker answers, sums the counters and histograms of all of
them (prometheus_client's multiprocess mode), so they stay exact. Each gauge says how the
processes' values combine (`multiprocess_mode`): queue depth and capacity add up over live
workers, weights and model info are the same in every worker (max), log gauges too.

Labels are named for what they carry: `arm` is an experiment's arm (always beside
`experiment`), `bundle` the name of a loaded bundle (its registry directory). The batcher's
and the model's series are per loaded bundle, whichever arms and experiments it serves.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ctrserve.common.keys import LOG_KINDS
from ctrserve.service.experiments.guardrails import LATENCY_BUCKETS_S

LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1., 2., 5.)
ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Label values the code emits, created at 0 up front so that rate() and increase() see the
# first increment: shed reasons (batcher.py), event types and statuses (events.py: the Lua
# script's replies; a malformed event of no known type counts as "other", "rejected").
SHED_REASONS = ("admission", "overload", "deadline")
EVENT_TYPES = ("impression", "download")
EVENT_STATUSES = ("accepted", "duplicate", "rejected")
SWAP_RESULTS = ("loaded", "refused")
ArmLabels = tuple[str, str, str]  # (experiment, arm, control: "true" or "false")
# ctrserve_guardrail_threshold's `guardrail` label values, with the config value of each
GUARDRAILS = ("latency_p99_seconds", "error_share", "calibration_min", "calibration_max")
# ctrserve_model_info's labels, in order (models.LoadedModel.labels() gives them)
MODEL_INFO_LABELS = ("bundle", "version", "model_type", "providers")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ctrserve_requests_total", "HTTP requests",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("ctrserve_request_duration_seconds", "HTTP request latency",
                                 ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("ctrserve_request_candidates", "candidates per score request",
                                    buckets=ROW_BUCKETS, registry=r)
        # the batcher of each loaded bundle (service/batcher.py)
        self.batch_rows = Histogram("ctrserve_batch_rows", "rows per inference batch",
                                    ["bundle"], buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("ctrserve_batch_requests", "requests per inference batch",
                                        ["bundle"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_wait = Histogram("ctrserve_queue_wait_seconds", "time queued before inference",
                                    ["bundle"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("ctrserve_inference_seconds", "onnxruntime time per batch",
                                   ["bundle"], buckets=LATENCY_BUCKETS, registry=r)
        # CPU, where the histogram above is wall time: apart they show a starved core
        self.inference_cpu = Counter("ctrserve_inference_cpu_seconds", "CPU time of the "
                                     "thread that ran onnxruntime, over its runs", ["bundle"],
                                     registry=r)
        self.queue_depth = Gauge("ctrserve_queue_depth_rows", "rows waiting for inference",
                                 ["bundle"], registry=r, multiprocess_mode="livesum")
        self.queue_capacity = Gauge("ctrserve_queue_capacity_rows", "rows the queue takes "
                                    "before it sheds (queue_capacity_rows)", ["bundle"],
                                    registry=r, multiprocess_mode="livesum")
        self.shed = Counter("ctrserve_shed", "requests refused: at the admission limit "
                            "before any work (admission), past the queue's capacity (overload), "
                            "past their deadline (deadline)", ["reason"], registry=r)
        self.admission_limit = Gauge("ctrserve_admission_limit", "score requests admitted in "
                                     "flight at most (adapts to their latency), summed over "
                                     "workers", registry=r, multiprocess_mode="livesum")
        self.model_info = Gauge("ctrserve_model_info", "each loaded bundle's model (value 1)",
                                list(MODEL_INFO_LABELS), registry=r,
                                multiprocess_mode="livemax")
        self.heap_frozen = Gauge("ctrserve_heap_frozen_objects", "objects frozen out of "
                                 "the collector's walks after start-up or the last model "
                                 "change (service/heap.py; 0 in-process), summed over workers",
                                 registry=r, multiprocess_mode="livesum")
        self.swaps = Counter("ctrserve_swaps_total", "bundles loaded, or refused (the bundle "
                             "failed verification)", ["bundle", "result"], registry=r)
        # A/B counts: the recording rules in deploy/ read these names and labels
        ab = ["experiment", "arm"]
        self.impressions = Counter("ctrserve_impressions", "items shown (accepted impressions, "
                                   "holdout excluded)", ab, registry=r)
        self.downloads = Counter("ctrserve_downloads", "accepted downloads, holdout excluded",
                                 ab, registry=r)
        self.users = Counter("ctrserve_users", "users counted, once per arm and UTC day", ab,
                             registry=r)
        self.events = Counter("ctrserve_events", "events received by type and status",
                              ["type", "status"], registry=r)
        self.arm_weight = Gauge("ctrserve_arm_weight", "configured share of the experiment's "
                                "non-holdout users of each served arm; control: its control "
                                "arm", ["experiment", "arm", "control"], registry=r,
                                multiprocess_mode="livemax")
        self.missing_fields = Counter("ctrserve_missing_fields", "score requests in which a "
                                      "model field had no value (encoded as unknown)",
                                      ["field"], registry=r)
        # the logs (event_log.py): bounded streams, drained by `ctrserve drain-events --follow`
        self.serve_log_dropped = Counter("ctrserve_serve_log_dropped", "served requests not "
                                         "logged: their arm's serve stream was full", registry=r)
        self.log_entries = Gauge("ctrserve_log_entries", "entries waiting in the fullest "
                                 "stream of each log", ["log"], registry=r,
                                 multiprocess_mode="livemax")
        self.log_capacity = Gauge("ctrserve_log_capacity_entries", "entries a stream takes "
                                  "(max_log_entries)", registry=r, multiprocess_mode="livemax")
        self.log_lag = Gauge("ctrserve_log_lag_seconds", "age of the oldest undrained entry "
                             "of each log (0: drained)", ["log"], registry=r,
                             multiprocess_mode="livemax")
        self._guardrail_metrics(r, ab)
        self._arms: set[ArmLabels] = set()
        self._guarded: set[str] = set()
        self._precreate()

    def _guardrail_metrics(self, r: CollectorRegistry, ab: list[str]) -> None:
        """Per-arm guardrails (service/experiments/guardrails.py), holdout excluded: the
        alerts in deploy/prometheus read these names and labels."""
        self.arm_latency = Histogram("ctrserve_arm_request_duration_seconds", "score requests "
                                     "of each arm, body read to reply built, failed ones "
                                     "included", ab, buckets=LATENCY_BUCKETS_S, registry=r)
        self.arm_errors = Counter("ctrserve_arm_request_errors", "score requests of each arm "
                                  "that failed after it was chosen (5xx: deadline, Redis, "
                                  "overload, model)", ab, registry=r)
        self.arm_items = Counter("ctrserve_arm_returned_items", "items returned by each arm's "
                                 "answered score requests", ab, registry=r)
        self.arm_probability = Counter("ctrserve_arm_returned_probability", "sum of the "
                                       "predicted probabilities of those items", ab, registry=r)
        self.guardrail = Gauge("ctrserve_guardrail_threshold", "each served experiment's "
                               "guardrail thresholds: latency_p99_seconds, error_share, "
                               "calibration_min, calibration_max",
                               ["experiment", "guardrail"], registry=r,
                               multiprocess_mode="livemax")

    def _precreate(self) -> None:
        for reason in SHED_REASONS:
            self.shed.labels(reason)
        for kind in EVENT_TYPES:
            for status in EVENT_STATUSES:
                self.events.labels(kind, status)
        self.events.labels("other", "rejected")
        for log in LOG_KINDS:
            self.log_entries.labels(log)
            self.log_lag.labels(log)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every worker's values, combined
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)

    def loaded(self, labels: dict[str, str]) -> None:
        """A bundle's model loaded and served (`labels`: MODEL_INFO_LABELS): its info series
        is 1, and the load counted (its other result created at 0)."""
        self.model_info.labels(**labels).set(1)
        self._count_swap(labels["bundle"], "loaded")

    def refused(self, bundle: str) -> None:
        """A bundle failed to load (verification, ONNX inputs): count it."""
        self._count_swap(bundle, "refused")

    def _count_swap(self, bundle: str, result: str) -> None:
        for each in SWAP_RESULTS:
            self.swaps.labels(bundle, each)
        self.swaps.labels(bundle, result).inc()

    def drop_model(self, labels: dict[str, str], queue: bool = True) -> None:
        """A model no longer served: its info series goes and, with `queue`, its bundle's queue
        gauges (a later model of the bundle makes new ones; the draining batcher's updates no
        longer show). The caller keeps what another served model of the bundle shares."""
        _drop(self.model_info, *(labels[name] for name in MODEL_INFO_LABELS))
        if queue:
            _drop(self.queue_depth, labels["bundle"])
            _drop(self.queue_capacity, labels["bundle"])

    def set_arms(self, weights: dict[ArmLabels, float]) -> None:
        """Export exactly these arms' weights: the new series are set first and the series of
        arms no longer served removed after, so no scrape sees an empty set. Their A/B
        counters are created at 0 (an arm's first impression then shows in increase())."""
        for labels, weight in weights.items():
            self.arm_weight.labels(*labels).set(weight)
            for counter in (self.impressions, self.downloads, self.users, self.arm_latency,
                            self.arm_errors, self.arm_items, self.arm_probability):
                counter.labels(*labels[:2])
        for labels in self._arms - weights.keys():
            _drop(self.arm_weight, *labels)
        self._arms = set(weights)

    def set_guardrails(self, thresholds: dict[str, dict[str, float]]) -> None:
        """Export exactly these experiments' thresholds ({experiment: {guardrail: value}},
        guardrails as in GUARDRAILS), new ones first, as set_arms does."""
        for experiment, values in thresholds.items():
            for name in GUARDRAILS:
                self.guardrail.labels(experiment, name).set(values[name])
        for experiment in self._guarded - thresholds.keys():
            for name in GUARDRAILS:
                _drop(self.guardrail, experiment, name)
        self._guarded = set(thresholds)


def _drop(gauge: Gauge, *labels: str) -> None:
    """Remove a gauge's series; set to 0 first, as multiprocess mode keeps the last value a
    process wrote in its file (the series then shows 0 instead of a stale value)."""
    gauge.labels(*labels).set(0)
    gauge.remove(*labels)


class RequestRecorder:
    """ctrserve_requests_total and ctrserve_request_latency_seconds by endpoint (known paths,
    else "other") and status, with the labelled children cached."""

    def __init__(self, metrics: Metrics, endpoints: set[str]):
        self.metrics, self.endpoints = metrics, endpoints
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def record(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in self.endpoints else "other"
        children = self._children.get((endpoint, status))
        if children is None:
            children = (self.metrics.requests.labels(endpoint, str(status)),
                        self.metrics.latency.labels(endpoint, str(status)))
            self._children[(endpoint, status)] = children
        children[0].inc()
        children[1].observe(seconds)


class ArmRecorder:
    """The per-arm guardrail series of score requests, with the labelled children cached."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}

    def _of(self, experiment: str, arm: str) -> tuple[Any, Any, Any, Any]:
        children = self._children.get((experiment, arm))
        if children is None:
            m = self.metrics
            children = self._children[experiment, arm] = tuple(
                metric.labels(experiment, arm) for metric in
                (m.arm_latency, m.arm_errors, m.arm_items, m.arm_probability))
        return children

    def served(self, experiment: str, arm: str, seconds: float, items: int,
               probability: float) -> None:
        latency, _, returned, predicted = self._of(experiment, arm)
        latency.observe(seconds)
        returned.inc(items)
        predicted.inc(probability)

    def failed(self, experiment: str, arm: str, seconds: float) -> None:
        latency, errors, _, _ = self._of(experiment, arm)
        latency.observe(seconds)
        errors.inc()


class MetricsMiddleware:
    """Counts and times every HTTP request by endpoint and status."""

    def __init__(self, app: Any, recorder: RequestRecorder):
        self.app, self.recorder = app, recorder

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.recorder.record(scope["path"], status, time.perf_counter() - started)
