"""Scorer settings: flags or environment variables prefixed CTRSERVE_ (REDIS_URL also works).

Defaults and the measurement behind each are listed in docs/operations.md ("Settings").
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ctrserve.service.attribution import parse_keys

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTRSERVE_", extra="ignore",
                                      protected_namespaces=())

    # ---- what to serve ------------------------------------------------------------------
    registry: Path = Field(default_factory=lambda: default_registry(),
                           description="registry directory of bundles (default: ./registry, "
                                       "or the demo's ./demo/registry when only that exists)")
    bundle: str = Field("", description="bundle to serve: a name in the registry or a path")
    experiments_file: Path | None = Field(None, description="experiments config (YAML or "
                                                            "JSON); unset: one arm, `bundle`")
    experiment: str = Field("default", description="the experiment without experiments_file")
    arm: str = Field("control", description="its one arm")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int | None = Field(None, ge=1, le=256,
                                description="scorer processes sharing the port, each with its "
                                            "own batcher and session (unset: one per usable "
                                            "core, `ctrserve serve`; one in process)")

    # ---- request limits -----------------------------------------------------------------
    max_candidates: int = Field(1000, ge=1, description="candidates per request")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size")
    request_deadline_ms: float = Field(1000.0, gt=0, description="queue wait + inference")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection's request headers "
                                                            "must arrive within this")
    body_timeout_s: float = Field(10.0, gt=0, description="a request's body must arrive "
                                                          "within this (else 408)")
    max_connections: int = Field(2048, ge=1, description="open connections (and requests) "
                                                         "per process; past it uvicorn "
                                                         "answers 503")
    redis_timeout_s: float = Field(1.0, gt=0, description="socket timeout of the scorer's "
                                                          "Redis calls: a stalled Redis answers "
                                                          "503 in about this long")

    # ---- dynamic batching ---------------------------------------------------------------
    batching: bool = Field(True, description="coalesce rows across requests (off: one "
                                             "inference per request)")
    batch_max_rows: int = Field(256, ge=1, description="row budget of one inference "
                                                       "(a larger single request runs alone)")
    batch_max_delay_ms: float = Field(0.0, ge=0, description="how long the first request of "
                                                            "a batch waits for company")
    queue_capacity_rows: int = Field(8192, ge=1, description="rows waiting; past it 503")
    inference_thread: bool | None = Field(
        None, description="run onnxruntime on a thread beside the event loop, or on the loop "
        "itself (unset: a thread with one worker that may use more than one core, else the "
        "loop; service/batcher.py)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 503")
    admission: bool = Field(True, description="shed score requests before reading them past "
                                              "an adaptive in-flight limit (service/admission.py)")
    admission_target_ms: float | None = Field(
        None, gt=0, description="mean latency the admission limit steers admitted requests to, "
                                "and the pause before a connection whose request was shed is "
                                "read again (default: a tenth of request_deadline_ms)")
    admission_min: int = Field(16, ge=1, description="in-flight score requests always admitted")
    admission_initial: int = Field(64, ge=1, description="the limit at start, before any "
                                                         "latency was measured")
    admission_max: int = Field(4096, ge=1, description="in-flight score requests at most")

    # ---- onnxruntime --------------------------------------------------------------------
    ort_threads: int = Field(1, ge=1, description="intra-op threads per session")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [CPU], description="execution providers, e.g. cuda,cpu")
    warmup_rounds: int = Field(3, ge=0)

    # ---- features -----------------------------------------------------------------------
    redis_url: str | None = Field(None, validation_alias=AliasChoices("CTRSERVE_REDIS_URL",
                                                                      "REDIS_URL"))
    redis_db: Path | None = Field(None, description="embedded Redis file; default "
                                                    "REGISTRY/.redis/ctrserve.rdb")
    load_features: Path | None = Field(None, description="synth dir loaded into the feature "
                                                         "store at start")
    user_id_field: str | None = Field(None, description="default: user_id or user")
    item_id_field: str | None = Field(None, description="default: item_id, app_id or item")
    position_field: str | None = Field("slot", description="filled with the 1-based "
                                                           "candidate position when absent")
    fill_clock: bool = Field(True, description="fill absent hour/weekday from the UTC clock")
    strict_fields: bool = Field(False, description="a model field that neither the request "
                                "nor the feature store gives is a 422 naming it (off: it is "
                                "encoded as unknown, listed in the reply's missing_fields and "
                                "counted in ctrserve_missing_fields_total)")
    item_cache_ttl_s: float = Field(60.0, gt=0, description="bounded staleness of item records")
    item_cache_max_items: int = Field(200_000, ge=1)
    shared_cache_max_rows: int = Field(65_536, ge=1, description="encoded user+context rows")

    # ---- events and counts --------------------------------------------------------------
    events: bool = Field(True, description="log each score and accept events for it "
                                           "(off: /v1/events rejects every event)")
    attribution_window_s: int = Field(86_400, ge=60, description="how long after its request "
                                                                  "an event is accepted")
    attribution_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="'kid:secret,...' signing the attribution tokens: "
        "the first signs, all verify (rotation); unset: a random key shared through Redis")
    dedup_window_s: int = Field(3_600, ge=60, description="a repeated event id is a "
                                                          "duplicate for at least this long")
    event_clock_skew_s: int = Field(300, ge=0, description="how far an event's ts may lie "
                                                           "outside its attribution window")
    counts_retention_days: int = Field(90, ge=1, description="per-user, per-arm, per-day "
                                                             "counts expire this long after "
                                                             "the day")
    max_log_entries: int = Field(1_000_000, ge=100, description="entries per arm's log stream "
                                 "before events answer 503 and served records are dropped "
                                 "(the drainer is behind)")
    log_sample_s: float = Field(5.0, gt=0, description="how often the log lengths and the "
                                                        "drain lag are read for /metrics")
    events_api_key: str | None = Field(None, description="X-API-Key that POST /v1/events "
                                                         "requires; unset: open")
    max_events: int = Field(1000, ge=1, description="events per /v1/events batch")
    clock: Literal["server", "client"] = Field(
        "server", description="which clock dates a scored request for its A/B day bucket and "
                              "log partition: server (production) or client, a "
                              "simulation/backfill switch under which the request's own `ts` "
                              "decides (requests without one use the server clock); events are "
                              "then bounded by the request's ts, not by the server's clock")
    client_clock_max_ahead_s: int = Field(366 * 86_400, ge=0, description="with clock=client: "
                                          "how far past the scorer's clock a request's ts may "
                                          "lie (a simulated future week passes, year 9999 "
                                          "does not)")
    redis_cluster: bool = Field(False, description="REDIS_URL names a node of a Redis "
                                                   "Cluster")

    # ---- admin and shutdown -------------------------------------------------------------
    admin_api_key: str | None = Field(None, description="X-API-Key for /admin; unset: off")
    drain_timeout_s: float = Field(10.0, ge=0)
    shutdown_delay_s: float = Field(2.0, ge=0, description="after SIGTERM, /readyz answers 503 "
                                                          "while requests are still served this "
                                                          "long (a proxy's health check takes "
                                                          "the replica out first)")
    deploy_poll_s: float = Field(2.0, gt=0, description="how often the deployment state in "
                                                        "Redis is checked for a change")

    @field_validator("providers", "attribution_keys", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("attribution_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        parse_keys(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.queue_capacity_rows < self.max_candidates:
            raise ValueError(f"queue_capacity_rows ({self.queue_capacity_rows}) must be >= "
                             f"max_candidates ({self.max_candidates})")
        self.providers = [_provider(p) for p in self.providers]
        if not self.admission_min <= self.admission_initial <= self.admission_max:
            raise ValueError(f"admission_min ({self.admission_min}) <= admission_initial "
                             f"({self.admission_initial}) <= admission_max "
                             f"({self.admission_max}) does not hold")
        if self.redis_cluster and not self.redis_url:
            raise ValueError("redis_cluster needs REDIS_URL (a node of the cluster)")
        if self.dedup_window_s > self.attribution_window_s:
            raise ValueError(f"dedup_window_s ({self.dedup_window_s}) must be <= "
                             f"attribution_window_s ({self.attribution_window_s})")
        return self

    @property
    def inference_on_thread(self) -> bool:
        """One process with a second core overlaps inference with the loop on a thread;
        several processes use the cores as processes, and one held to a single core has
        nothing to overlap with: both run it on the loop, without the hand-off's cost
        (service/batcher.py)."""
        if self.inference_thread is not None:
            return self.inference_thread
        return (self.workers or 1) == 1 and usable_cores() > 1

    @property
    def admission_target_s(self) -> float:
        # a tenth of the deadline: clients hold a connection per request in flight, so a
        # deeper queue fills their pools and they queue on their side, where no server limit
        # sees it (bench_overload: at 10 candidates, 1.5x, goodput 0.15 of saturation with a
        # fifth against 0.64 with a tenth); p99 of admitted requests runs at about 3x the mean
        target_ms = self.admission_target_ms or self.request_deadline_ms / 10
        return target_ms / 1000

    def embedded_redis_db(self) -> Path:
        return self.redis_db or self.registry / ".redis" / "ctrserve.rdb"


def usable_cores() -> int:
    """The cores this process may run on (a cpuset or `taskset` narrows them; a CPU quota
    does not show here)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quota_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (`docker run --cpus`, a Kubernetes CPU limit), or None
    when there is none: cgroup v2's cpu.max ("max 100000" or "150000 100000"), else v1's
    cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def default_workers() -> int:
    """One scorer process per core this process may use: its affinity, capped by a CPU quota
    (rounded up: 1.5 cores get two)."""
    quota = quota_cores()
    cores = usable_cores()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def default_registry() -> Path:
    """./registry; where only the demo's ./demo/registry exists (make demo writes it), that
    one, so that after the demo every command finds its bundles and Redis without flags."""
    if not Path("registry").is_dir() and Path("demo", "registry").is_dir():
        return Path("demo", "registry")
    return Path("registry")


def _provider(name: str) -> str:
    short = {"cpu": CPU, "cuda": CUDA}
    return short.get(name.strip().lower(), name.strip())
