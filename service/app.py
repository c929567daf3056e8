"""The scorer's FastAPI app: `create_app(settings)`.

Start-up (lifespan): Redis (REDIS_URL or embedded), optional feature loading, load, verify and
warm the bundle (or every bundle of the experiments file), start their batchers, record the
experiments' arms and weights in Redis (for `ctrserve report`), apply the deployment state in
Redis (it wins over the file) and start following it; only then is /readyz 200.
Shutdown: uvicorn first lets in-flight requests finish, then the batchers drain
their queues and Redis is closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ctrserve import __version__
from ctrserve.common.keys import SIGNING_KEY
from ctrserve.service import heap
from ctrserve.service.admission import AdaptiveLimit
from ctrserve.service.attribution import AUTO_KID, Signer, parse_keys
from ctrserve.service.deploy_follower import DeploymentFollower
from ctrserve.service.errors import install_handlers
from ctrserve.service.events import EventIngest, EventRules
from ctrserve.service.feature_store import FeatureStore
from ctrserve.service.log_lag import LagSampler
from ctrserve.service.metrics import Metrics, MetricsMiddleware, RequestRecorder
from ctrserve.service.models import ModelRegistry
from ctrserve.service.redis_rounds import RoundTrips
from ctrserve.service.redis_server import REPORT_TIMEOUT_S, open_redis, sync_client
from ctrserve.service.routers import dashboard, events, experiments, health, metrics, models, score
from ctrserve.service.routers.events import EventsRequest
from ctrserve.service.routing import Routing
from ctrserve.service.schemas import ScoreRequest, SwapRequest
from ctrserve.service.score_endpoint import ScoreEndpoint
from ctrserve.service.scoring import Scorer
from ctrserve.service.serve_log import ServeLog
from ctrserve.service.settings import Settings

log = logging.getLogger("ctrserve.service")
ENDPOINTS = {"/v1/score", "/healthz", "/readyz", "/v1/models", "/admin/swap", "/metrics",
             "/v1/experiments", "/v1/assignment", "/admin/experiments", "/v1/events",
             "/dashboard"}


class ScorerApp(FastAPI):
    """FastAPI, with POST /v1/score handed to a bare ASGI endpoint before the middleware stack
    (service/score_endpoint.py: the stack cost 28-35 µs of CPU per request, now 9-13 µs)."""

    score_endpoint: ScoreEndpoint | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (self.score_endpoint is not None and scope["type"] == "http"
                and scope["path"] == "/v1/score" and scope["method"] == "POST"):
            await self.score_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = ScorerApp(title="ctrserve scorer", version=__version__, lifespan=_lifespan)
    # app.state: the routes take its objects typed, through service/dependencies.py (which
    # names each attribute set here and in _lifespan); the score endpoint holds it itself
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    install_handlers(app)
    for module in (score, events, health, models, experiments, metrics, dashboard):
        app.include_router(module.router)
    limit = None
    if settings.admission:
        limit = AdaptiveLimit(settings.admission_target_s, settings.admission_min,
                              settings.admission_initial, settings.admission_max,
                              capacity_rows=settings.queue_capacity_rows)
        app.state.admission = limit
        app.state.metrics.admission_limit.set(limit.limit)
    recorder = RequestRecorder(app.state.metrics, ENDPOINTS)
    app.score_endpoint = ScoreEndpoint(app.state, recorder, limit)
    app.add_middleware(MetricsMiddleware, recorder=recorder)
    _document_raw_bodies(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    settings: Settings = state.settings
    state.redis = await open_redis(settings)
    try:
        if settings.load_features:
            await asyncio.to_thread(load_features, settings, state.redis.url)
        rounds = RoundTrips(state.redis.client)  # the user reads and serve-log appends share
        store = FeatureStore(state.redis.client, rounds)
        state.models = ModelRegistry(settings, state.metrics, store)
        try:
            state.routing = Routing(settings, state.models, state.redis.client)
            await state.routing.start()
            state.follower = DeploymentFollower(state.routing, state.redis.client,
                                                settings.deploy_poll_s)
            await state.follower.sync()  # a deployment state in Redis wins over the file
            signer = Signer(await signing_keys(settings, state.redis.client))
            serve_log = None
            if settings.events:
                serve_log = ServeLog(state.redis.client, settings.max_log_entries,
                                     state.metrics.serve_log_dropped, rounds)
            state.scorer = Scorer(settings, state.models, store, state.metrics, state.routing,
                                  serve_log, signer, getattr(state, "admission", None))
            rules = EventRules(signer, settings.attribution_window_s,
                               settings.event_clock_skew_s, settings.clock == "client")
            state.ingest = EventIngest(state.redis.client, state.metrics, rules,
                                       settings.max_events, settings.dedup_window_s,
                                       settings.counts_retention_days, settings.max_log_entries)
            state.metrics.log_capacity.set(settings.max_log_entries)
            state.lag = LagSampler(state.redis.client, state.metrics, settings.log_sample_s)
            state.metrics.heap_frozen.set(heap.settle())
            state.ready = True
            state.follower.start()
            state.lag.start()
            log.info("ready: %s", {k: m.version for k, m in state.models.models.items()})
            yield
        finally:
            state.ready = False
            if getattr(state, "follower", None) is not None:
                await state.follower.stop()
            if getattr(state, "lag", None) is not None:
                await state.lag.stop()
            if getattr(state, "scorer", None) is not None:
                await state.scorer.close()  # its guardrail sums of the last second
            await state.models.close()
    finally:
        await state.redis.close()


async def signing_keys(settings: Settings, client: Any) -> list[tuple[str, bytes]]:
    """The configured attribution keys, or the random one every replica on this Redis shares."""
    if settings.attribution_keys:
        return parse_keys(settings.attribution_keys)
    await client.set(SIGNING_KEY, secrets.token_hex(32), nx=True)
    return [(AUTO_KID, await client.get(SIGNING_KEY))]


def load_features(settings: Settings, url: str) -> None:
    """Write the feature tables of `settings.load_features` (a synth dir) into the Redis at
    `url` (a bulk write: the longer timeout of the report's bulk reads)."""
    from ctrserve.service.feature_store import load_tables, synth_files

    users, items = synth_files(settings.load_features)
    client = sync_client(url, settings.redis_cluster,
                         max(settings.redis_timeout_s, REPORT_TIMEOUT_S))
    try:
        meta = load_tables(client, users, items, settings.user_id_field, settings.item_id_field)
    finally:
        client.close()
    log.info("feature store: %d users, %d items from %s", meta["users"]["rows"],
             meta["items"]["rows"], settings.load_features)


def _document_raw_bodies(app: FastAPI) -> None:
    """Routes that parse their own bodies still show the request schemas in the OpenAPI docs."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ScoreRequest, SwapRequest, EventsRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
