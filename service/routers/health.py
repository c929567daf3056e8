"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic_core import to_json
from starlette.responses import Response

from ctrserve.service.dependencies import ReadyDep
from ctrserve.service.errors import error_response

router = APIRouter(tags=["health"])
REDIS_TIMEOUT_S = 1.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ready: ReadyDep) -> Response:
    """Models loaded and warmed, and Redis answering: 200, else 503 saying what is missing."""
    if ready is None:
        return error_response(503, [{"loc": ["models"], "msg": "models not loaded yet",
                                     "type": "not_ready"}])
    try:
        await asyncio.wait_for(ready.redis.client.ping(), REDIS_TIMEOUT_S)
    except Exception as exc:
        return error_response(503, [{"loc": ["redis"], "msg": f"Redis does not answer: {exc!r}",
                                     "type": "not_ready"}])
    versions = {key: m.version for key, m in ready.models.models.items()}
    return Response(to_json({"status": "ready", "models": versions}),
                    media_type="application/json")
