"""POST /v1/events (impressions and downloads) and GET /v1/experiments/{name}/report."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Literal

import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel
from pydantic_core import to_json
from starlette.responses import Response

from ctrserve.service.counts import build_report, experiment_configs
from ctrserve.service.dependencies import IngestDep, RedisDep, RoutingDep, SettingsDep
from ctrserve.service.errors import NotFound, NotReady, Unauthorized
from ctrserve.service.events import Download, Impression
from ctrserve.service.redis_server import RedisHandle
from ctrserve.service.routers.score import read_body
from ctrserve.service.schemas import ErrorResponse

router = APIRouter(tags=["events"])


class EventResult(BaseModel):
    event_id: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None = None
    detail: str | None = None
    experiment: str | None = None
    arm: str | None = None
    counted: bool | None = None


class EventsResponse(BaseModel):
    accepted: int
    duplicate: int
    rejected: int
    results: list[EventResult]


class EventsRequest(BaseModel):
    events: list[Impression | Download]


@router.post("/v1/events", response_model=EventsResponse,
             responses={s: {"model": ErrorResponse} for s in (401, 413, 422, 503)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": f"#/components/schemas/{EventsRequest.__name__}"}}}}})
async def events(request: Request, settings: SettingsDep, ingest: IngestDep) -> Response:
    """Impressions and downloads, each accepted, a duplicate, or rejected with its reason.

    A 200 answers every event; an accepted event is counted and in the event log. A body that
    is not `{"events": [...]}` is a 422 naming the field. A 503 with per-event results means
    the event log is full (the drainer is behind): send the batch again after Retry-After.
    With `CTRSERVE_EVENTS_API_KEY` set, the X-API-Key header must carry it (else 401).
    """
    key = settings.events_api_key
    if key is not None and not hmac.compare_digest(request.headers.get("x-api-key", ""), key):
        raise Unauthorized(["header", "X-API-Key"], "POST /v1/events needs the events API key "
                           "(CTRSERVE_EVENTS_API_KEY)")
    body = await read_body(request, settings)
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        reply = await ingest.ingest(body)
    except redis.RedisError as exc:
        raise NotReady(["redis"], f"event store unavailable: {exc}", retry) from None
    if reply.pop("log_full"):  # accepted ones come back as duplicates when sent again
        return Response(to_json(reply), status_code=503, media_type="application/json",
                        headers=retry)
    return Response(to_json(reply), media_type="application/json")


@router.get("/v1/experiments/{name}/report", responses={404: {"model": ErrorResponse}})
async def experiment_report(name: str, settings: SettingsDep, routing: RoutingDep,
                            handle: RedisDep) -> Response:
    """Per day and in total: impressions, downloads, users, CTR and CVR with intervals, uplift
    over control with p-values, and the sample-ratio check against the configured weights."""
    config = experiment_configs(routing.experiments).get(name)
    if config is None:
        raise NotFound(["path", "name"], f"unknown experiment {name!r}")
    try:
        rep = await asyncio.to_thread(_report, handle, name, config)
    except redis.RedisError as exc:
        raise NotReady(["redis"], f"counts unavailable: {exc}",
                       {"Retry-After": str(settings.retry_after_s)}) from None
    return Response(to_json(rep), media_type="application/json")


def _report(handle: RedisHandle, name: str, config: dict[str, Any]) -> dict[str, Any]:
    client = handle.sync_client()
    try:
        return build_report(client, name, config["control"], config["weights"])
    finally:
        client.close()
