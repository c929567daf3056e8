"""GET /dashboard (the experiments; a redirect when there is one) and GET /dashboard/{experiment}
(its A/B dashboard as one HTML page; see service/dashboard/).

The report and the deployment history are read like `GET /v1/experiments/{name}/report` reads
its report: blocking redis-py calls in a worker thread, off the event loop. With the same
thread, the retrain records of the registry, which place the deployments of `ctrserve retrain`
on the clients' days under clock=client (service/dashboard/timeline.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from fastapi import APIRouter
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ctrserve.service.counts import build_report, experiment_configs
from ctrserve.service.dashboard.page import experiment_page, index_page, not_found_page
from ctrserve.service.dashboard.timeline import serving_days
from ctrserve.service.dependencies import ModelsDep, RedisDep, RoutingDep, SettingsDep
from ctrserve.service.deployments import history
from ctrserve.service.errors import NotReady
from ctrserve.service.redis_server import RedisHandle
from ctrserve.service.routers.experiments import describe
from ctrserve.service.routing import Routing

router = APIRouter(tags=["dashboard"])
# the page loads nothing from anywhere: inline styles and SVG only, no script
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                      "img-src data:; frame-ancestors 'none'",
           "Cache-Control": "no-store"}
RETRAIN_DIR = ".retrain"  # training/retrain.py's records: REGISTRY/.retrain/<E>--<arm>--<day>.json


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard_index(routing: RoutingDep) -> Response:
    """The experiments with links to their dashboards; with only one, a redirect to it."""
    names = _names(routing)
    if len(names) == 1:
        return RedirectResponse(f"/dashboard/{quote(names[0], safe='')}", status_code=307)
    return HTMLResponse(index_page(names), headers=HEADERS)


@router.get("/dashboard/{experiment}", response_class=HTMLResponse,
            responses={404: {"description": "unknown experiment (an HTML page naming it)"}})
async def experiment_dashboard(experiment: str, settings: SettingsDep, routing: RoutingDep,
                               models: ModelsDep, handle: RedisDep) -> Response:
    """The verdict per treatment arm (always-valid intervals), the sample-ratio check, totals
    with uplift, daily CTR and CVR (downloads per user) charts with 95% bands on the
    experiment's days, the per-day figures, the model each arm serves, and the deployment
    history of one experiment."""
    config = experiment_configs(routing.experiments).get(experiment)
    if config is None:
        return HTMLResponse(not_found_page(experiment, _names(routing)), status_code=404,
                            headers=HEADERS)
    described = describe(routing.experiments, models)
    serving = next(e for e in described.experiments if e.name == experiment)
    # only under clock=client do the retrain records place deployments (timeline.py)
    registry = settings.registry if settings.clock == "client" else None
    try:
        rep, records, retrains = await asyncio.to_thread(_read, handle, experiment, config,
                                                         registry)
    except redis.RedisError as exc:
        raise NotReady(["redis"], f"counts unavailable: {exc}",
                       {"Retry-After": str(settings.retry_after_s)}) from None
    page = experiment_page(rep, serving.model_dump(), records, clock=settings.clock,
                           serving_days=serving_days(retrains, experiment))
    return HTMLResponse(page, headers=HEADERS)


def _names(routing: Routing) -> list[str]:
    return [e.name for e in routing.experiments.config.experiments]


def _read(handle: RedisHandle, name: str, config: dict[str, Any], registry: Path | None
          ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The experiment's report (the JSON report's own function), deployment history and, given
    a registry, retrain records."""
    retrains = [] if registry is None else _retrain_records(registry, name)
    client = handle.sync_client()
    try:
        return (build_report(client, name, config["control"], config["weights"]),
                history(client, name), retrains)
    finally:
        client.close()


def _retrain_records(registry: Path, name: str) -> list[dict[str, Any]]:
    """The experiment's retrain records; one being written or unreadable is skipped (its
    deployment then has no marker, which the history says)."""
    records = []
    for path in sorted((registry / RETRAIN_DIR).glob(f"{name}--*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records
