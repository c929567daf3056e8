"""GET /v1/experiments, GET /v1/assignment (QA) and PUT /admin/experiments (X-API-Key)."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from ctrserve.service.dependencies import FollowerDep, ModelsDep, RoutingDep, SettingsDep
from ctrserve.service.errors import InvalidBody, NotFound
from ctrserve.service.experiments.assignment import BUCKETS, Assignment
from ctrserve.service.experiments.config import (
    ExperimentConfig,
    ExperimentConfigError,
    ExperimentSet,
    UnknownExperiment,
    parse_experiments,
    parse_text,
)
from ctrserve.service.models import ModelRegistry
from ctrserve.service.routers.models import authorize
from ctrserve.service.routers.score import read_body
from ctrserve.service.schemas import (
    ArmInfo,
    AssignmentResponse,
    CanaryInfo,
    ErrorResponse,
    ExperimentAssignment,
    ExperimentInfo,
    ExperimentsResponse,
    NamespaceInfo,
)

router = APIRouter(tags=["experiments"])
CONFIG_EXAMPLE = {"experiments": [{"name": "ranker", "salt": "ranker-1", "arms": [
    {"name": "control", "weight": 0.9, "bundle": "lr-...", "control": True},
    {"name": "deepfm", "weight": 0.1, "bundle": "deepfm-..."}]}]}


@router.get("/v1/experiments", response_model=ExperimentsResponse)
async def list_experiments(routing: RoutingDep, models: ModelsDep) -> Response:
    """Every experiment with its arms' weights, bundles, model versions, bucket ranges and
    canaries."""
    return _json(describe(routing.experiments, models))


@router.get("/v1/assignment", response_model=AssignmentResponse,
            responses={404: {"model": ErrorResponse}})
async def assignment(routing: RoutingDep, models: ModelsDep,
                     user_id: str = Query(min_length=1, max_length=256),
                     experiment: str | None = Query(None)) -> Response:
    """The bucket and arm of one user in the named (or default) experiment (forced
    assignments, the holdout, namespaces and canaries included), and `experiments`: the user
    in every experiment."""
    experiments = routing.experiments
    try:
        named = _placed(models, *experiments.assign(experiment, user_id))
    except UnknownExperiment as exc:
        raise NotFound(["query", "experiment"], str(exc)) from None
    every = [_placed(models, a, key) for a, key in experiments.assign_all(user_id)]
    return _json(AssignmentResponse(user_id=user_id, **named.model_dump(), experiments=every))


def _placed(models: ModelRegistry, a: Assignment, key: str) -> ExperimentAssignment:
    return ExperimentAssignment(
        experiment=a.experiment, in_experiment=a.in_experiment, arm=a.arm, bucket=a.bucket,
        holdout=a.holdout, forced=a.forced, canary=a.canary,
        model_version=models.get(key).version, namespace=a.namespace,
        namespace_bucket=a.namespace_bucket)


@router.put("/admin/experiments", response_model=ExperimentsResponse,
            responses={s: {"model": ErrorResponse} for s in (401, 403, 413, 422)},
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"example": CONFIG_EXAMPLE}, "application/yaml": {}}}})
async def replace_experiments(request: Request, settings: SettingsDep, routing: RoutingDep,
                              models: ModelsDep, follower: FollowerDep,
                              x_api_key: str | None = Header(None)) -> Response:
    """Validate a new config (JSON or YAML body), load and warm its new bundles, switch to it
    and store it in Redis, where every worker follows it (and a scorer restarted on the same
    experiments file).

    Invalid: 422 naming the field, and the running config stays.
    """
    authorize(settings.admin_api_key, x_api_key)
    fmt = "yaml" if "yaml" in request.headers.get("content-type", "") else "json"
    try:
        text = await read_body(request, settings)
        new = parse_experiments(parse_text(text, fmt), settings.registry)
        await routing.replace(new)
    except ExperimentConfigError as exc:
        raise InvalidBody([{**i, "loc": ["body", *i["loc"]]} for i in exc.items]) from None
    if follower is not None:
        await follower.sync()  # the arms' canaries in the deployment state
    return _json(describe(routing.experiments, models))


def describe(experiments: ExperimentSet, models: ModelRegistry) -> ExperimentsResponse:
    infos = []
    for e in experiments.config.experiments:
        split = experiments.splitters[e.name]
        ranges = split.ranges()
        arms = [ArmInfo(name=a.name, weight=a.weight, control=a.control, bundle=a.bundle,
                        model_version=_version(models, experiments.keys[a.bundle]),
                        buckets=list(ranges[a.name]),
                        canary=_canary(experiments, models, e.name, a.name)) for a in e.arms]
        holdout = [split.holdout_from, BUCKETS] if split.holdout_from < BUCKETS else None
        infos.append(ExperimentInfo(name=e.name, salt=e.salt, holdout=e.holdout,
                                    holdout_buckets=holdout, arms=arms, forced=e.forced,
                                    namespace=_namespace(e)))
    return ExperimentsResponse(buckets=BUCKETS, default=experiments.default, experiments=infos)


def _namespace(e: ExperimentConfig) -> NamespaceInfo | None:
    if e.namespace is None:
        return None
    space = e.namespace.buckets()
    return NamespaceInfo(name=space.name, salt=space.salt, range=list(e.namespace.range),
                         buckets=[space.start, space.end])


def _canary(experiments: ExperimentSet, models: ModelRegistry, experiment: str, arm: str
            ) -> CanaryInfo | None:
    canary = experiments.canaries.get((experiment, arm))
    if canary is None:
        return None
    return CanaryInfo(bundle=canary.bundle, share=canary.share,
                      model_version=_version(models, experiments.keys[canary.bundle]))


def _version(models: ModelRegistry, key: str) -> str:
    model = models.models.get(key)
    return model.version if model else ""


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
