"""A bounded schemathesis run over the live scorer's OpenAPI document.

Every operation gets its explicit examples and generated valid (positive) and invalid
(negative) requests, and must never answer 5xx and must answer as the document says (status
codes, content types, headers, bodies; invalid requests refused). Requests the document allows
but the scorer refuses for reasons it cannot state (an experiment or bundle that does not exist,
a user id the models need) are also sent shaped past those reasons, so that the handlers behind
the validation are fuzzed too: scoring, events with a real attribution token, the report, a
swap, a new experiments config. A real uvicorn scorer on loopback, two arms of an experiment
over an embedded Redis loaded with the synthetic world, and the admin key."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

API_KEY = "fuzz-key"
MAX_EXAMPLES = 25  # per operation, generation mode and key
MAX_STATEFUL = 5  # shaped admin requests: each loads and warms bundles
EXPERIMENT, ARMS = "ranker", ("control", "treatment")
KEY = {"x-api-key": API_KEY}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

# Every operation of the document (a new one fails test_every_operation_is_fuzzed until it is
# listed here). POST /v1/score is served by a bare ASGI endpoint ahead of FastAPI
# (service/score_endpoint.py); FastAPI's route for it only describes it in the document.
OPERATIONS = [
    "POST /v1/score",
    "POST /v1/events",
    "GET /v1/experiments",
    "GET /v1/experiments/{name}/report",
    "GET /v1/assignment",
    "GET /v1/models",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /dashboard",
    "GET /dashboard/{experiment}",
    "POST /admin/swap",
    "PUT /admin/experiments",
]
ADMIN = {"POST /admin/swap", "PUT /admin/experiments"}

# Checks that do not apply to an operation, each with its reason.
NOT_APPLICABLE = {
    # events are validated one by one: a batch holding a malformed event is a 200 that reports
    # it rejected ("malformed"), as the operation's description says
    "POST /v1/events": {negative_data_rejection},
}


@pytest.fixture(scope="module")
def scorer(bundles: dict[str, Path], synth_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The scorer with an LR control and a DeepFM treatment. The admin operations change what
    it serves (a swap to a bundle of the registry, a config with the same experiment and arms);
    nothing here depends on which bundle serves an arm, so they run on the same server."""
    tmp = tmp_path_factory.mktemp("schema-fuzz")
    registry = copy_registry(bundles, tmp / "registry")
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(experiments_config(
        sorted(p.name for p in registry.iterdir()))))
    # Admission control off and a long deadline: shedding under load is a documented 503
    # (tests/test_overload.py), and a stall of the shared CI cores must not read as a 5xx here.
    settings_ = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                         redis_db=tmp / "redis" / "store.rdb", load_features=synth_dir,
                         admin_api_key=API_KEY, max_candidates=50, max_body_bytes=64 * 1024,
                         warmup_rounds=1, admission=False, request_deadline_ms=30_000)
    with LiveServer(settings_) as live:
        live.registry = registry
        yield live


@pytest.fixture(scope="module")
def schema(scorer: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(scorer.url + "/openapi.json")


def experiments_config(bundles: list[str]) -> dict[str, Any]:
    return {"experiments": [{"name": EXPERIMENT, "salt": "ranker-fuzz", "arms": [
        {"name": ARMS[0], "weight": 0.5, "bundle": bundles[0], "control": True},
        {"name": ARMS[1], "weight": 0.5, "bundle": bundles[-1]}]}]}


def test_every_operation_is_fuzzed(schema: schemathesis.BaseSchema) -> None:
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == set(OPERATIONS)


# ---- shaping: past the refusals the document cannot state ----------------------------------

def _scalar_or_tokens(value: object) -> bool:
    if isinstance(value, list):
        return all(isinstance(t, str | int) and not isinstance(t, bool) for t in value)
    return value is None or isinstance(value, str | int | float)


def _features(values: object) -> object:
    if not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if _scalar_or_tokens(v)}


def scorable(case: schemathesis.Case) -> schemathesis.Case:
    """A user id (these models have a user field), feature values that are scalars or lists of
    tokens (the document allows any JSON value there: reported), top_k at most the candidates,
    and an experiment that exists."""
    body = dict(case.body)
    body["user_id"] = body.get("user_id") or "fuzz-user"
    for key in ("user_features", "context"):
        body[key] = _features(body.get(key))
    body["candidates"] = [{**c, "features": _features(c["features"])} if "features" in c else c
                          for c in body["candidates"]]
    if body.get("top_k") is not None:
        body["top_k"] = min(body["top_k"], len(body["candidates"]))
    if body.get("experiment") is not None:
        body["experiment"] = EXPERIMENT
    case.body = body
    return case


def attributed(served: dict[str, Any]) -> Callable[[schemathesis.Case], schemathesis.Case]:
    """Events of a real score response: its token, user and items, the time now."""
    items = served["item_ids"]

    def shape(case: schemathesis.Case) -> schemathesis.Case:
        events = []
        for i, event in enumerate(case.body["events"]):
            event = {**event, "attribution": served["attribution"], "user_id": "fuzz-user",
                     "ts": datetime.now(UTC).isoformat()}
            if event.get("request_id") is not None:
                event["request_id"] = served["request_id"]
            if event["type"] == "download":
                event["item_id"] = items[i % len(items)]
            else:
                slots = [(int(s["position"]) - 1) % len(items) for s in event["items"]]
                event["items"] = [{"item_id": items[k], "position": k + 1} for k in slots]
            events.append(event)
        case.body = {"events": events}
        return case

    return shape


def with_path(name: str, value: str) -> Callable[[schemathesis.Case], schemathesis.Case]:
    def shape(case: schemathesis.Case) -> schemathesis.Case:
        case.path_parameters = {**case.path_parameters, name: value}
        return case

    return shape


def in_experiment(case: schemathesis.Case) -> schemathesis.Case:
    if case.query.get("experiment") is not None:
        case.query = {**case.query, "experiment": EXPERIMENT}
    return case


SHAPED = {"POST /v1/score", "POST /v1/events", "GET /v1/experiments/{name}/report",
          "GET /dashboard/{experiment}", "GET /v1/assignment", "POST /admin/swap",
          "PUT /admin/experiments"}


def shaped(label: str, positive: st.SearchStrategy, live: LiveServer
           ) -> tuple[st.SearchStrategy, int] | None:
    """The shaped cases of an operation (one of SHAPED) and how many to send."""
    bundles = sorted(p.name for p in live.registry.iterdir())
    if label == "POST /v1/score":
        return positive.map(scorable), MAX_EXAMPLES
    if label == "POST /v1/events":
        reply = httpx.post(live.url + "/v1/score", timeout=30, json={
            "user_id": "fuzz-user", "candidates": [{"item_id": f"a{i:04d}"} for i in range(5)]})
        assert reply.status_code == 200, reply.text
        return positive.map(attributed(reply.json())), MAX_EXAMPLES
    if label == "GET /v1/experiments/{name}/report":
        return positive.map(with_path("name", EXPERIMENT)), MAX_EXAMPLES
    if label == "GET /dashboard/{experiment}":
        return positive.map(with_path("experiment", EXPERIMENT)), MAX_EXAMPLES
    if label == "GET /v1/assignment":
        return positive.map(in_experiment), MAX_EXAMPLES
    if label == "POST /admin/swap":
        def swap(drawn: tuple[schemathesis.Case, str, str]) -> schemathesis.Case:
            case, bundle, arm = drawn
            case.body = {"bundle": bundle, "arm": arm}
            return case

        return (st.tuples(positive, st.sampled_from(bundles), st.sampled_from(ARMS)).map(swap),
                MAX_STATEFUL)
    if label == "PUT /admin/experiments":
        def config(drawn: tuple[schemathesis.Case, list[str]]) -> schemathesis.Case:
            case, order = drawn
            case.media_type, case.body = "application/json", experiments_config(order)
            return case

        return (st.tuples(positive, st.permutations(bundles)).map(config), MAX_STATEFUL)
    return None


# ---- the run ---------------------------------------------------------------------------------

def run_cases(strategy: st.SearchStrategy, max_examples: int,
              call: Callable[[schemathesis.Case], None]) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        call(case)

    run()


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_operation_answers_5xx_or_off_its_document(schema: schemathesis.BaseSchema,
                                                      scorer: LiveServer, label: str) -> None:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    seen: Counter[tuple[str, int]] = Counter()
    replies: list[Any] = []
    session = requests.Session()

    def call(mode: str, headers: dict[str, str] | None) -> Callable[[schemathesis.Case], None]:
        checks = [c for c in CHECKS + ([negative_data_rejection] if mode == "negative" else [])
                  if c not in NOT_APPLICABLE.get(label, set())]

        def one(case: schemathesis.Case) -> None:
            response = case.call(base_url=scorer.url, session=session, headers=headers,
                                 timeout=60)
            seen[mode, response.status_code] += 1
            if mode == "shaped" and response.status_code == 200 and label == "POST /v1/events":
                replies.append(response.json())
            case.validate_response(response, checks=checks, headers=headers)

        return one

    for headers in ([None, KEY] if label in ADMIN else [None]):  # at the key check, and past it
        for example in schema.get_strategies_from_examples(operation):
            run_cases(example, 1, call("example", headers))
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        run_cases(positive, MAX_EXAMPLES, call("positive", headers))
        takes = (operation.body, operation.query, operation.path_parameters, operation.headers)
        # Unsatisfiable: the document refuses nothing it takes (no body schema, any string)
        with contextlib.suppress(Unsatisfiable):
            if any(takes):
                run_cases(operation.as_strategy(GenerationMode.NEGATIVE), MAX_EXAMPLES,
                          call("negative", headers))
        extra = shaped(label, positive, scorer)
        if extra is not None and (headers is not None or label not in ADMIN):
            run_cases(extra[0], extra[1], call("shaped", headers))

    statuses = Counter(status for (_, status) in seen.elements())
    print(f"{label}: {sum(statuses.values())} requests, "
          f"{json.dumps({f'{m} {s}': n for (m, s), n in sorted(seen.items())})}")
    assert statuses and all(status < 500 for status in statuses), seen
    if label in SHAPED:  # the handler behind the validation ran
        assert seen["shaped", 200] > 0, seen
    if label == "POST /v1/score":  # the bare endpoint refuses what the document refuses
        assert seen["negative", 422] > 0, seen
    if label == "POST /v1/events":
        assert sum(r["accepted"] for r in replies) > 0, replies
    if label in ADMIN:
        assert seen["positive", 401] > 0, seen
    assert httpx.get(scorer.url + "/readyz").status_code == 200, "the scorer stopped serving"
