"""GET /dashboard (the experiments; a redirect when there is one) and GET /dashboard/{experiment}
(its A/B dashboard as one HTML page; see service/dashboard/).

The report and the deployment history are read like `GET /v1/experiments/{name}/report` reads
its report: blocking redis-py calls in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import redis
from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from service.counts import build_report, experiment_configs
from service.dashboard.page import experiment_page, index_page, not_found_page
from service.deployments import history
from service.errors import NotReady
from service.redis_server import RedisHandle
from service.routers.experiments import describe

router = APIRouter(tags=["dashboard"])
# the page loads nothing from anywhere: inline styles and SVG only, no script
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                      "img-src data:; frame-ancestors 'none'",
           "Cache-Control": "no-store"}


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard_index(request: Request) -> Response:
    """The experiments with links to their dashboards; with only one, a redirect to it."""
    names = _names(request)
    if len(names) == 1:
        return RedirectResponse(f"/dashboard/{quote(names[0], safe='')}", status_code=307)
    return HTMLResponse(index_page(names), headers=HEADERS)


@router.get("/dashboard/{experiment}", response_class=HTMLResponse,
            responses={404: {"description": "unknown experiment (an HTML page naming it)"}})
async def experiment_dashboard(request: Request, experiment: str) -> Response:
    """Daily CTR and CVR charts with 95% bands, totals with uplift and the sample-ratio check,
    the model each arm serves, and the deployment history of one experiment."""
    state = request.app.state
    config = experiment_configs(state.routing.experiments).get(experiment)
    if config is None:
        return HTMLResponse(not_found_page(experiment, _names(request)), status_code=404,
                            headers=HEADERS)
    described = describe(state.routing.experiments, state.models)
    serving = next(e for e in described.experiments if e.name == experiment)
    try:
        rep, records = await asyncio.to_thread(_read, state.redis, experiment, config)
    except redis.RedisError as exc:
        raise NotReady(["redis"], f"counts unavailable: {exc}",
                       {"Retry-After": str(state.settings.retry_after_s)}) from None
    return HTMLResponse(experiment_page(rep, serving.model_dump(), records), headers=HEADERS)


def _names(request: Request) -> list[str]:
    return [e.name for e in request.app.state.routing.experiments.config.experiments]


def _read(handle: RedisHandle, name: str, config: dict[str, Any]
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The experiment's report (the JSON report's own function) and deployment history."""
    client = handle.sync_client()
    try:
        return (build_report(client, name, config["control"], config["weights"]),
                history(client, name))
    finally:
        client.close()
