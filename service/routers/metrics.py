"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ctrserve.service.dependencies import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "every metric in the Prometheus text format",
    "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(scorer_metrics: MetricsDep) -> Response:
    return Response(scorer_metrics.render(), media_type=CONTENT_TYPE_LATEST)
