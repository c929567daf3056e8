"""One score request from raw body to reply bytes.

parse (request_parser.py: orjson, or pydantic) -> user record (Redis) -> arm and model
(service/experiments: the arm's bundle, or its canary's for the canary's share of its users)
-> shared row (cached) -> item rows (cached, misses from Redis) -> assemble -> batcher ->
serve-log record (serve_log.py, one write shared with concurrent requests) -> reply with its
signed attribution token (attribution.py) -> pydantic_core.to_json.
Between picking the model and queuing its rows only the item-cache
refill awaits; if a swap or a new experiment set closed the model's queue meanwhile, the
request starts over on the new set and model.

Guardrails (service/experiments/guardrails.py): a request whose arm was chosen (holdout aside)
is timed, and counted as failed when it ends in a 5xx (a Redis error on the user read counts
against the arm the user is routed to), or with its returned items and the sum of their
scores: Prometheus series per arm (metrics.ArmRecorder) and the per-arm-day sums in Redis
(counts.GuardrailSums). The Scorer also exports the thresholds of the experiment set it routes
by, whenever that set changes.
"""

from __future__ import annotations

import asyncio
import time
from operator import itemgetter
from typing import Any

import numpy as np
import redis
from pydantic_core import to_json

from ctrserve.service.admission import AdaptiveLimit
from ctrserve.service.attribution import Signer, new_request_id, utc_day
from ctrserve.service.batcher import BatcherClosed
from ctrserve.service.counts import DAY_S, GuardrailSums
from ctrserve.service.encoding import Feeds, overwrite
from ctrserve.service.errors import (
    ApiError,
    DeadlineExceeded,
    InvalidInput,
    NotReady,
)
from ctrserve.service.experiments.assignment import Assignment
from ctrserve.service.experiments.config import ExperimentSet, GuardrailsConfig, UnknownExperiment
from ctrserve.service.feature_store import FeatureStore
from ctrserve.service.metrics import ArmRecorder, Metrics
from ctrserve.service.models import LoadedModel, ModelRegistry
from ctrserve.service.plan import FieldPlan, clock_values, kind_error
from ctrserve.service.request_parser import parse_request
from ctrserve.service.routing import Routing
from ctrserve.service.schemas import ScoreRequest
from ctrserve.service.serve_log import Served, ServeLog
from ctrserve.service.settings import Settings

ATTEMPTS = 3
_ITEM_ID = itemgetter("item_id")


class Scorer:
    def __init__(self, settings: Settings, models: ModelRegistry, store: FeatureStore,
                 metrics: Metrics, routing: Routing, serve_log: ServeLog | None = None,
                 signer: Signer | None = None, admission: AdaptiveLimit | None = None):
        self.settings, self.models, self.store, self.routing = settings, models, store, routing
        self.serve_log, self.signer, self.admission = serve_log, signer, admission
        self._candidates, self._missing = metrics.candidates, metrics.missing_fields
        self._deadline_s = settings.request_deadline_ms / 1000
        self._client_clock = settings.clock == "client"
        self._metrics, self._arms = metrics, ArmRecorder(metrics)
        self._sums = GuardrailSums(store.client, settings.counts_retention_days)
        self._day = UtcDay()
        self._experiments: ExperimentSet | None = None
        if routing.experiments is not None:
            self._follow(routing.experiments)

    async def close(self) -> None:
        await self._sums.close()

    async def score(self, body: bytes) -> bytes:
        started = time.monotonic()
        deadline = started + self._deadline_s
        req = parse_request(body, self.settings.max_candidates)
        if self._client_clock and req.ts is not None and \
                req.ts > time.time() + self.settings.client_clock_max_ahead_s:
            raise InvalidInput(["body", "ts"], "ts lies too far in the future of the scorer's "
                               "clock (clock=client dates requests by ts; at most "
                               "client_clock_max_ahead_s ahead)")
        self._candidates.observe(len(req.candidates))
        if self.admission is not None:
            self.admission.observe_rows(len(req.candidates))
        try:
            user = None if req.user_id is None else await self.store.user(req.user_id)
        except redis.RedisError as exc:
            self._failed(self._route(req)[0], req, started)
            raise self._unavailable(exc) from None
        return await self._serve(req, user, started, deadline)

    async def _serve(self, req: ScoreRequest, user: dict | None, started: float,
                     deadline: float) -> bytes:
        """Route, infer and reply (over again when a swap closed the model's queue); a 5xx
        once the arm is chosen counts against its guardrails."""
        arm = None
        ids, custom = candidate_ids(req)
        try:
            for _ in range(ATTEMPTS):
                arm, key = self._route(req)
                model = self.models.get(key)
                if req.user_id is None and model.plan.user_id:
                    raise InvalidInput(["body", "user_id"], "required: the model of arm "
                                       f"{arm.arm!r} has the user field {model.plan.user_id!r}")
                try:
                    probs, values, digests = await self._infer(model, req, user, ids, custom,
                                                               deadline)
                except BatcherClosed:
                    continue
                return await self._reply(req, arm, model, probs, values, ids, digests, custom,
                                         started)
            raise DeadlineExceeded(["model"], "the model was swapped repeatedly; retry")
        except redis.RedisError as exc:
            self._failed(arm, req, started)
            raise self._unavailable(exc) from None
        except Exception as exc:
            if not isinstance(exc, ApiError) or exc.status >= 500:
                self._failed(arm, req, started)
            raise

    def _unavailable(self, exc: redis.RedisError) -> NotReady:
        return NotReady(["redis"], f"feature store unavailable: {exc}",
                        {"Retry-After": str(self.settings.retry_after_s)})

    def _route(self, req: ScoreRequest) -> tuple[Assignment, str]:
        """The user's arm (the set is re-read on each attempt: it may have been replaced)."""
        experiments = self.routing.experiments
        if experiments is not self._experiments:
            self._follow(experiments)
        try:
            return experiments.assign(req.experiment, req.user_id)
        except UnknownExperiment as exc:
            raise InvalidInput(["body", "experiment"], str(exc)) from None

    def _follow(self, experiments: ExperimentSet) -> None:
        """Export the guardrail thresholds of the set routed by from now on."""
        self._experiments = experiments
        self._metrics.set_guardrails({e.name: threshold_values(e.guardrails)
                                      for e in experiments.config.experiments})

    def _served(self, arm: Assignment, ts: float, started: float, items: int,
                probability: float) -> None:
        if not arm.holdout:
            seconds = time.monotonic() - started
            self._arms.served(arm.experiment, arm.arm, seconds, items, probability)
            self._sums.add(arm.experiment, arm.arm, self._day(ts), seconds, False, items,
                           probability)

    def _failed(self, arm: Assignment | None, req: ScoreRequest, started: float) -> None:
        if arm is not None and not arm.holdout:
            seconds = time.monotonic() - started
            ts = req.ts if self._client_clock and req.ts is not None else time.time()
            self._arms.failed(arm.experiment, arm.arm, seconds)
            self._sums.add(arm.experiment, arm.arm, self._day(ts), seconds, True, 0, 0.0)

    async def _infer(self, model: LoadedModel, req: ScoreRequest, user: dict | None,
                     ids: list[str], custom: list[int], deadline: float
                     ) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        """Probabilities, the shared field values they were computed from, and the items'
        attribution digests."""
        plan, enc = model.plan, model.encoder
        values = shared_values(plan, req, user)
        self._check_missing(missing_fields(plan, values, req.candidates))
        shared = enc.shared(values)
        items, digests = await self._item_rows(model, ids)
        feeds = enc.assemble(len(ids), shared, items)
        if custom:
            await self._custom_rows(model, req, custom, values, feeds)
        future = model.batcher.submit(feeds, len(ids), deadline)
        # a timer on the future itself: a third of asyncio.timeout's cost per request
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + deadline - time.monotonic(), self._expire, future)
        try:
            return await future, values, digests
        finally:
            timer.cancel()

    def _check_missing(self, missing: list[str]) -> None:
        """Shared fields without a value: a 422 under strict_fields, else counted (and listed
        in the reply by _reply)."""
        if not missing:
            return
        if self.settings.strict_fields:
            raise InvalidInput(["body", "context"], f"model fields {missing} have no value: "
                               "give them in context or user_features, or load the user's "
                               "record (strict_fields is on)")
        for name in missing:
            self._missing.labels(name).inc()

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():
            future.set_exception(DeadlineExceeded(
                ["deadline"], f"no result within {self.settings.request_deadline_ms:.0f} ms"))

    async def _item_rows(self, model: LoadedModel, ids: list[str]) -> tuple[Feeds, np.ndarray]:
        """The items' encoded rows and attribution digests, read together: a later request's
        refill may start the cache over."""
        rows = model.encoder.items
        now = time.monotonic()
        idx, stale = rows.locate(ids, now)
        if stale:
            rows.put(stale, await self.store.items(stale), now)
            idx, _ = rows.locate(ids, now)
        return rows.gather(idx), rows.digests(idx)

    async def _custom_rows(self, model: LoadedModel, req: ScoreRequest, custom: list[int],
                           values: dict[str, Any], feeds: Feeds) -> None:
        """Candidates with their own features: encoded whole, over the cached rows."""
        plan = model.plan
        records = await self.store.items([req.candidates[i]["item_id"] for i in custom])
        rows = []
        for i, record in zip(custom, records, strict=True):
            cand = req.candidates[i]
            row = dict(values)
            row.update({f: record[f] for f in plan.item if record and f in record})
            if plan.item_id:
                row[plan.item_id] = cand["item_id"]
            if plan.position:
                row[plan.position] = i + 1
            row.update(checked(plan, cand["features"], ["body", "candidates", i, "features"],
                               per_candidate=True))
            rows.append(row)
        overwrite(feeds, np.array(custom), model.encoder.full_rows(rows))

    async def _reply(self, req: ScoreRequest, arm: Assignment, model: LoadedModel,
                     probs: np.ndarray, values: dict[str, Any], ids: list[str],
                     digests: np.ndarray, custom: list[int], started: float) -> bytes:
        scores = probs.astype(np.float64)  # the float32 values exactly
        positions = None
        if req.top_k is not None:
            order = np.argsort(-probs, kind="stable")[: req.top_k]
            ids, scores, positions = [ids[i] for i in order], scores[order], order.tolist()
            digests = digests[order]
        request_id = req.request_id or new_request_id()
        ts = req.ts if self._client_clock and req.ts is not None else time.time()
        attribution = None
        if self.serve_log is not None and self.signer is not None and req.user_id is not None:
            own = {req.candidates[i]["item_id"]: req.candidates[i]["features"] for i in custom}
            await self.serve_log.record(Served(request_id, arm.experiment, arm.arm,
                                               model.version, req.user_id, ids, arm.holdout,
                                               ts, values, own, req.ts))
            attribution = self.signer.issue(request_id, arm.experiment, arm.arm, model.version,
                                            req.user_id, ts, arm.holdout, ids, self._day(ts),
                                            digests)
        returned = scores.tolist()
        self._served(arm, ts, started, len(returned), sum(returned))
        return to_json({
            "request_id": request_id,
            "experiment": arm.experiment,
            "arm": arm.arm,
            "holdout": arm.holdout,
            "model_version": model.version,
            "item_ids": ids,
            "scores": returned,
            "positions": positions,
            "ts": ts,
            "attribution": attribution,
            "missing_fields": missing_fields(model.plan, values, req.candidates),
        })


class UtcDay:
    """utc_day(ts), recomputed only when ts leaves the day of the last call."""

    def __init__(self) -> None:
        self.start, self.end, self.day = 0.0, 0.0, ""

    def __call__(self, ts: float) -> str:
        if not self.start <= ts < self.end:
            self.start = ts - ts % DAY_S
            self.end, self.day = self.start + DAY_S, utc_day(ts)
        return self.day


def threshold_values(config: GuardrailsConfig) -> dict[str, float]:
    """A guardrails block as the values of ctrserve_guardrail_threshold, by its label."""
    low, high = config.calibration
    return {"latency_p99_seconds": config.latency_p99_ms / 1000,
            "error_share": config.error_share, "calibration_min": low, "calibration_max": high}


def candidate_ids(req: ScoreRequest) -> tuple[list[str], list[int]]:
    """The candidates' item ids, and the positions of those that bring their own features."""
    if req._item_ids is not None:  # read by the fast parser: ids only
        return req._item_ids, []
    ids = list(map(_ITEM_ID, req.candidates))
    if max(map(len, req.candidates)) == 1:  # ids only: no loop in Python
        return ids, []
    # a candidate holds item_id and, if anything else, features (its schema forbids more)
    return ids, [i for i, c in enumerate(req.candidates) if len(c) > 1 and c["features"]]


def missing_fields(plan: FieldPlan, values: dict[str, Any],
                   candidates: list[dict[str, Any]]) -> list[str]:
    """Request-level fields without a value, unless every candidate gives its own."""
    return [f for f in plan.shared if values.get(f) is None
            and not all(c.get("features", {}).get(f) is not None for c in candidates)]


def shared_values(plan: FieldPlan, req: ScoreRequest, user: dict | None) -> dict[str, Any]:
    """Per-request field values: user record < user_features < context < request user id."""
    values: dict[str, Any] = {}
    if user:
        values.update({f: user[f] for f in plan.shared if f in user})
    if req.user_features:
        values.update(checked(plan, req.user_features, ["body", "user_features"]))
    if req.context:
        values.update(checked(plan, req.context, ["body", "context"]))
    if plan.clock:
        for name, value in clock_values(plan.clock).items():
            values.setdefault(name, value)
    if plan.user_id and req.user_id is not None:
        values[plan.user_id] = req.user_id
    return values


def checked(plan: FieldPlan, given: dict[str, Any], loc: list[str | int],
            per_candidate: bool = False) -> dict[str, Any]:
    """Request-given values, refused with their location if unknown or of the wrong kind."""
    for name, value in given.items():
        spec = plan.specs.get(name)
        if spec is None:
            raise InvalidInput([*loc, name], f"unknown field {name!r}; the model's fields are "
                               f"{sorted(plan.specs)}")
        if not per_candidate and (name in plan.item or name == plan.position):
            raise InvalidInput([*loc, name], f"{name!r} is a per-candidate field; give it in "
                               "candidates[].features")
        problem = kind_error(spec, value)
        if problem:
            raise InvalidInput([*loc, name], f"field {name!r} ({spec.kind}): {problem}")
    return given
