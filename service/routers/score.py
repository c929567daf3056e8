"""POST /v1/score: the raw body goes straight to pydantic and the reply is bytes.

FastAPI's default path (json.loads, then validation, then jsonable_encoder and json.dumps)
costs about 1.2 ms per request more at 100 candidates; see docs/architecture.md, "Performance".
Even its request layer (dependency solving, endpoint wrapping) cost a fifth of the throughput at
10 candidates (2,450 against 3,000 requests/s, 16 concurrent), and the middleware stack around
any route 28-35 µs of CPU per request, so service/score_endpoint.py serves the path as a
bare ASGI endpoint ahead of both; this FastAPI route only documents it in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.errors import BodyTimeout, BodyTooLarge, ClientClosed
from service.schemas import ErrorResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["score"])

ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (413, "body larger than max_body_bytes"), (422, "invalid request, the field named"),
    (503, "overloaded (Retry-After) or not ready"), (504, "deadline passed"))}


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": f"#/components/schemas/{ScoreRequest.__name__}"}}}}})
async def score(request: Request) -> Response:
    """Probability of a click/download for each candidate of one user."""
    # not reached through ScorerApp (service/score_endpoint.py answers first); kept working
    # for an app mounted without it
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    reply = await request.app.state.scorer.score(body)
    return Response(reply, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` bytes, or when it does not
    arrive within the app's `body_timeout_s` (408); a client that hangs up midway is a 499."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(["body"], f"body of {declared} bytes exceeds {limit} bytes")
    timeout_s = request.app.state.settings.body_timeout_s
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(["body"], f"body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(["body"], f"the body did not arrive within {timeout_s:g} s "
                          "(body_timeout_s)") from None
    except ClientDisconnect:
        raise ClientClosed(["body"], "the client closed the connection before the body "
                           "arrived") from None
    return b"".join(chunks)

