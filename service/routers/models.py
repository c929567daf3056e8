"""GET /v1/models and POST /admin/swap (hot swap; needs the X-API-Key header)."""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Header, Request
from pydantic import ValidationError
from starlette.responses import Response

from ctrserve.bundles import BundleError
from ctrserve.service.dependencies import FollowerDep, ModelsDep, RoutingDep, SettingsDep
from ctrserve.service.deployments import DeploymentError
from ctrserve.service.errors import (
    Conflict,
    Forbidden,
    InvalidBody,
    InvalidInput,
    NotFound,
    Unauthorized,
)
from ctrserve.service.errors import validation_items as _items
from ctrserve.service.experiments.config import ExperimentConfigError, ExperimentSet
from ctrserve.service.models import resolve_bundle
from ctrserve.service.routers.score import read_body
from ctrserve.service.routing import UnknownArm
from ctrserve.service.schemas import ErrorResponse, ModelsResponse, SwapRequest, SwapResponse

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse)
async def models(routing: RoutingDep, loaded: ModelsDep, follower: FollowerDep) -> Response:
    """What each arm serves: version, model type, bundle, providers, since when, field sources;
    and the deployment state version it follows (with the last refusal, if any)."""
    body = ModelsResponse(experiment=routing.experiments.default,
                          models=[m.info() for m in loaded.models.values()],
                          deployment=follower.status() if follower else None)
    return Response(body.model_dump_json(), media_type="application/json")


@router.post("/admin/swap", response_model=SwapResponse,
             responses={s: {"model": ErrorResponse} for s in (401, 403, 404, 409, 422)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/SwapRequest"}}}}})
async def swap(request: Request, settings: SettingsDep, routing: RoutingDep,
               x_api_key: str | None = Header(None)) -> Response:
    """Verify, load and warm a bundle of the registry, then serve it for an arm of the default
    experiment (`arm`: an arm name; default the only arm), atomically; /v1/experiments lists
    what is served. Recorded in the deployment state (kind `swap`), which every worker
    follows. A body over max_body_bytes is a 413 before it is read in full."""
    authorize(settings.admin_api_key, x_api_key)
    body = await read_body(request, settings)
    try:
        req = SwapRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidBody(_items(exc)) from None
    experiment = routing.experiments.default
    arm = req.arm or only_arm(routing.experiments, experiment)
    started = time.perf_counter()
    try:
        path = resolve_bundle(settings.registry, req.bundle, inside_registry=True)
        old, new = await routing.swap(experiment, arm, req.bundle)
    except UnknownArm as exc:
        raise NotFound(["body", "arm"], str(exc)) from None
    except DeploymentError as exc:  # its state was removed from Redis meanwhile
        raise Conflict(["body", "arm"], str(exc)) from None
    except (BundleError, ExperimentConfigError) as exc:
        raise InvalidInput(["body", "bundle"], f"refused, the old model keeps serving: "
                                               f"{exc}") from None
    reply = SwapResponse(arm=arm, from_version=old, to_version=new, bundle=str(path),
                         seconds=round(time.perf_counter() - started, 3))
    return Response(reply.model_dump_json(), media_type="application/json")


def only_arm(experiments: ExperimentSet, experiment: str) -> str:
    arms = [a.name for a in experiments.by_name[experiment].arms]
    if len(arms) != 1:
        raise InvalidInput(["body", "arm"], f"experiment {experiment!r} has several arms: "
                                            f"name one of {arms}")
    return arms[0]


def authorize(expected: str | None, given: str | None) -> None:
    if not expected:
        raise Forbidden(["header", "x-api-key"], "the admin API is off; set "
                                                 "CTRSERVE_ADMIN_API_KEY to turn it on")
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(["header", "x-api-key"], "missing or wrong X-API-Key")
