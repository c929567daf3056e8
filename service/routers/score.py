"""POST /v1/score: the raw body goes straight to pydantic and the reply is bytes.

FastAPI's default path (json.loads, then validation, then jsonable_encoder and json.dumps)
costs about 1.2 ms per request more at 100 candidates; see docs/architecture.md, "Performance".
Even its request layer (dependency solving, endpoint wrapping) cost a fifth of the throughput at
10 candidates (2,450 against 3,000 requests/s, 16 concurrent), and the middleware stack around
any route 28-35 µs of CPU per request, so service/score_endpoint.py serves the path as a
bare ASGI endpoint ahead of both; this FastAPI route only documents it in the OpenAPI schema.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ctrserve.service.dependencies import ScorerDep, SettingsDep
from ctrserve.service.schemas import ErrorResponse, ScoreRequest, ScoreResponse
from ctrserve.service.score_endpoint import read_body as read_raw_body
from ctrserve.service.settings import Settings

router = APIRouter(tags=["score"])

ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (413, "body larger than max_body_bytes"), (422, "invalid request, the field named"),
    (503, "overloaded (Retry-After) or not ready"), (504, "deadline passed"))}


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": f"#/components/schemas/{ScoreRequest.__name__}"}}}}})
async def score(request: Request, settings: SettingsDep, scorer: ScorerDep) -> Response:
    """Probability of a click/download for each candidate of one user."""
    # not reached through ScorerApp (service/score_endpoint.py answers first); kept working
    # for an app mounted without it
    body = await read_body(request, settings)
    reply = await scorer.score(body)
    return Response(reply, media_type="application/json")


async def read_body(request: Request, settings: Settings) -> bytes:
    """The body of a routed request, with the score endpoint's bounds (413 past
    max_body_bytes, 408, 499)."""
    return await read_raw_body(request.scope, request.receive, settings.max_body_bytes,
                               settings.body_timeout_s)
