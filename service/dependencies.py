"""Typed FastAPI dependencies: what the routes use of the app's state, each as its type.

service/app.py puts these objects on `app.state` (settings and metrics when the app is
created, the rest in its lifespan); a route takes them as parameters, e.g.
`routing: RoutingDep` (that is `Annotated[Routing, Depends(get_routing)]`), instead of reading
`request.app.state.routing` untyped, and a test can replace one with
`app.dependency_overrides`. The dependencies are coroutines, so FastAPI calls them on the event
loop (it runs a plain function in its thread pool, on every request).

POST /v1/score does not come through here: service/score_endpoint.py answers it ahead of
FastAPI's routing and dependency solving, which cost a fifth of its throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ctrserve.service.deploy_follower import DeploymentFollower
from ctrserve.service.events import EventIngest
from ctrserve.service.metrics import Metrics
from ctrserve.service.models import ModelRegistry
from ctrserve.service.redis_server import RedisHandle
from ctrserve.service.routing import Routing
from ctrserve.service.scoring import Scorer
from ctrserve.service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_redis(request: Request) -> RedisHandle:
    return request.app.state.redis


async def get_models(request: Request) -> ModelRegistry:
    return request.app.state.models


async def get_routing(request: Request) -> Routing:
    return request.app.state.routing


async def get_scorer(request: Request) -> Scorer:
    return request.app.state.scorer


async def get_ingest(request: Request) -> EventIngest:
    return request.app.state.ingest


async def get_follower(request: Request) -> DeploymentFollower | None:
    """The deployment follower; None before the lifespan starts it."""
    return getattr(request.app.state, "follower", None)


@dataclass(frozen=True)
class Ready:
    """What GET /readyz checks once the models are loaded and warmed."""

    redis: RedisHandle
    models: ModelRegistry


async def get_ready(request: Request) -> Ready | None:
    """None until the lifespan has loaded and warmed the models (and again from shutdown)."""
    state = request.app.state
    if not getattr(state, "ready", False):
        return None
    return Ready(state.redis, state.models)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RedisDep = Annotated[RedisHandle, Depends(get_redis)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
RoutingDep = Annotated[Routing, Depends(get_routing)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]
IngestDep = Annotated[EventIngest, Depends(get_ingest)]
FollowerDep = Annotated[DeploymentFollower | None, Depends(get_follower)]
ReadyDep = Annotated[Ready | None, Depends(get_ready)]
