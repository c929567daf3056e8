"""The experiment config file (YAML or JSON) and its validation.

    experiments:
      - name: ranker
        salt: ranker-2026-01
        holdout: 0.05            # optional share of users: control model, flagged holdout
        arms:
          - {name: control, weight: 0.9, bundle: lr-1a2b3c, control: true}
          - {name: deepfm, weight: 0.1, bundle: deepfm-4d5e6f}
        forced: {qa-user-1: deepfm}   # optional QA allowlist: user id -> arm
        namespace: {name: ranking, range: [0, 0.5]}   # optional: see below
        guardrails: {latency_p99_ms: 250, error_share: 0.01, calibration: [0.8, 1.25]}

Weights are fractions of the users outside the holdout and add up to 1 (within 1e-6). Bundles
are names in the registry, checked when the file is loaded. The first experiment is the default
of requests that name none. Errors name the field, e.g. `experiments.0.arms`.

A namespace makes experiments mutually exclusive: `range: [start, end]` is the half-open share
[start, end) of the namespace's users the experiment takes, 0 <= start < end <= 1 (it must hold
at least one of the 10,000 buckets). Ranges of one namespace must not overlap; the error names
both experiments and the overlap. Users outside the range are not in the experiment: a score
request naming it serves them the control arm's model, flagged holdout (not counted). An
experiment's salt must differ from every namespace's salt (`namespace:{name}`), or its arms
would not be independent of that namespace. Hashing: assignment.py.

Guardrails (optional; each field defaults to the value above) are the per-arm limits the report,
the dashboard and the Prometheus alerts judge every arm against: the p99 latency of its score
requests in ms (> 0), the share of them that failed after the arm was chosen (in (0, 1)), and
the band [low, high] that its calibration (mean predicted probability of the returned items over
the observed download rate) must stay in, 0 < low <= 1 <= high. Definitions:
service/experiments/guardrails.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ctrserve.bundles.registry import known_bundles, registry_entry
from ctrserve.service.experiments.assignment import (
    BUCKETS,
    Assignment,
    NamespaceRange,
    Splitter,
    bucket_ends,
    canary_bucket,
    canary_cutoff,
    canary_share_ok,
    namespace_salt,
    range_buckets,
)

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
WEIGHT_TOLERANCE = 1e-6
STRICT = ConfigDict(extra="forbid")


class ExperimentConfigError(ValueError):
    """An invalid config: `items` are {"loc", "msg", "type"} naming each field."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items
        super().__init__("; ".join(f"{'.'.join(map(str, i['loc'])) or 'config'}: {i['msg']}"
                                   for i in items))


class UnknownExperiment(LookupError):
    pass


class ArmConfig(BaseModel):
    model_config = STRICT

    name: Name
    weight: float = Field(ge=0, le=1, description="share of the users outside the holdout")
    bundle: str = Field(min_length=1, description="a bundle name in the registry")
    control: bool = False

    @field_validator("bundle")
    @classmethod
    def _in_registry(cls, value: str, info: ValidationInfo) -> str:
        registry = (info.context or {}).get("registry")
        if registry is not None and registry_entry(Path(registry), value) is None:
            raise ValueError(f"unknown bundle {value!r}: not a bundle name in the registry "
                             f"{registry} (or it leads outside it); bundles: "
                             f"{known_bundles(Path(registry))}")
        return value


class NamespaceConfig(BaseModel):
    model_config = STRICT

    name: Name
    range: tuple[float, float] = Field(
        description="[start, end): the half-open share of the namespace's users taken, "
                    "0 <= start < end <= 1")

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        start, end = value
        if not 0 <= start < 1:
            raise ValueError(f"range start {start:g} must be in [0, 1)")
        if not 0 < end <= 1:
            raise ValueError(f"range end {end:g} must be in (0, 1]")
        if start >= end:
            raise ValueError(f"range start {start:g} must be below its end {end:g}")
        first, stop = range_buckets(start, end)
        if first >= stop:
            raise ValueError(f"range {_span(start, end)} holds none of the {BUCKETS} buckets")
        return value

    def buckets(self) -> NamespaceRange:
        return NamespaceRange(self.name, *range_buckets(*self.range))


class GuardrailsConfig(BaseModel):
    model_config = STRICT

    latency_p99_ms: FiniteFloat = Field(250.0, gt=0, description="p99 of the arm's score requests")
    error_share: float = Field(0.01, gt=0, lt=1, description="failed over scored requests")
    calibration: tuple[FiniteFloat, FiniteFloat] = Field(
        (0.8, 1.25), description="[low, high]: mean predicted probability of the returned "
                                 "items over downloads per impression, 0 < low <= 1 <= high")

    @field_validator("calibration")
    @classmethod
    def _band(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= 1 <= high:  # a band without 1 flags a perfectly calibrated model
            raise ValueError(f"calibration band [{low:g}, {high:g}] must have 0 < low <= 1 "
                             "<= high")
        return value


class ExperimentConfig(BaseModel):
    model_config = STRICT

    name: Name
    salt: str = Field(min_length=1, description="changing it reshuffles every user")
    arms: list[ArmConfig] = Field(min_length=1)
    holdout: float = Field(0.0, ge=0, lt=1, description="share of users held out")
    forced: dict[str, str] = Field(default_factory=dict, description="user id -> arm, for QA")
    namespace: NamespaceConfig | None = Field(
        None, description="the namespace range taken; none: every user")
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig,
                                         description="per-arm limits; defaults when absent")

    @field_validator("salt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the salt must not be blank")
        return value

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[ArmConfig]) -> list[ArmConfig]:
        duplicates = _duplicates([a.name for a in arms])
        if duplicates:
            raise ValueError(f"duplicate arm names {duplicates}")
        controls = [a.name for a in arms if a.control]
        if len(controls) != 1:
            raise ValueError(f"exactly one arm must have control: true, found {len(controls)}"
                             + (f" ({controls})" if controls else ""))
        total = sum(a.weight for a in arms)
        if abs(total - 1) > WEIGHT_TOLERANCE:
            raise ValueError(f"arm weights add up to {total:g}, not 1 (weights are fractions)")
        return arms

    @field_validator("forced")
    @classmethod
    def _forced_arms(cls, forced: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        arms = {a.name for a in info.data.get("arms") or []}
        for user, arm in forced.items():
            if arms and arm not in arms:
                raise ValueError(f"user {user!r} is forced into unknown arm {arm!r}; arms: "
                                 f"{sorted(arms)}")
        return forced

    def control_arm(self) -> ArmConfig:
        return next(a for a in self.arms if a.control)

    def splitter(self) -> Splitter:
        return Splitter(self.name, self.salt, [a.name for a in self.arms],
                        bucket_ends([a.weight for a in self.arms], self.holdout),
                        self.control_arm().name, dict(self.forced),
                        self.namespace.buckets() if self.namespace else None)


class ExperimentsFile(BaseModel):
    model_config = STRICT

    experiments: list[ExperimentConfig] = Field(min_length=1)

    @field_validator("experiments")
    @classmethod
    def _unique(cls, experiments: list[ExperimentConfig]) -> list[ExperimentConfig]:
        duplicates = _duplicates([e.name for e in experiments])
        if duplicates:
            raise ValueError(f"duplicate experiment names {duplicates}")
        return experiments

    @field_validator("experiments")
    @classmethod
    def _namespaces(cls, experiments: list[ExperimentConfig]) -> list[ExperimentConfig]:
        problems = [*_namespace_overlaps(experiments), *_namespace_salts(experiments)]
        if problems:
            raise ValueError("; ".join(problems))
        return experiments


@dataclass(frozen=True)
class Canary:
    """A second bundle serving `share` of one arm's users (from the deployment state)."""

    bundle: str
    share: float

    @property
    def cutoff(self) -> int:
        return canary_cutoff(self.share)


Canaries = dict[tuple[str, str], Canary]  # (experiment, arm) -> its canary


class ExperimentSet:
    """Validated experiments, ready to route: dict lookups and a bisect per request."""

    def __init__(self, config: ExperimentsFile, keys: dict[str, str] | None = None,
                 canaries: Canaries | None = None):
        self.config = config
        self.canaries = dict(canaries or {})
        self.by_name = {e.name: e for e in config.experiments}
        self.splitters = {e.name: e.splitter() for e in config.experiments}
        self.default = config.experiments[0].name
        # bundle name -> key of its loaded model (the bundle name itself unless told)
        self.keys = keys or {b: b for b in self.bundles()}
        self._arm_keys = {(e.name, a.name): self.keys[a.bundle]
                          for e in config.experiments for a in e.arms}

    def key(self, experiment: str, arm: str) -> str:
        """The key of the model that serves `arm` of `experiment` (its canary aside)."""
        return self._arm_keys[experiment, arm]

    def bundles(self) -> list[str]:
        """Distinct bundle names of all arms, in config order, then those of the canaries."""
        arms = [a.bundle for e in self.config.experiments for a in e.arms]
        return list(dict.fromkeys([*arms, *(c.bundle for c in self.canaries.values())]))

    def splitter(self, experiment: str | None) -> Splitter:
        try:
            return self.splitters[experiment or self.default]
        except KeyError:
            raise UnknownExperiment(f"unknown experiment {experiment!r}; experiments: "
                                    f"{sorted(self.splitters)}") from None

    def assign(self, experiment: str | None, user_id: str | None) -> tuple[Assignment, str]:
        """The user's assignment and the key of the model that serves it (no user: the
        control's, outside the experiment)."""
        split = self.splitter(experiment)
        if user_id is None:
            a = split.anonymous()
            return a, self._arm_keys[a.experiment, a.arm]
        return self._serve(split, user_id)

    def assign_all(self, user_id: str) -> list[tuple[Assignment, str]]:
        """The user's assignment in every experiment (config order), each with its model key."""
        return [self._serve(split, user_id) for split in self.splitters.values()]

    def _serve(self, split: Splitter, user_id: str) -> tuple[Assignment, str]:
        a = split.assign(user_id)
        canary = self.canaries.get((a.experiment, a.arm)) if self.canaries else None
        if (canary is not None and not a.holdout
                and canary_bucket(split.salt, a.arm, user_id) < canary.cutoff):
            return replace(a, canary=True), self.keys[canary.bundle]
        return a, self._arm_keys[a.experiment, a.arm]


def parse_experiments(data: Any, registry: Path | None) -> ExperimentSet:
    """Validate a parsed config (bundles checked in `registry` unless None)."""
    try:
        config = ExperimentsFile.model_validate(data, context={"registry": registry})
    except ValidationError as exc:
        raise ExperimentConfigError([
            {"loc": list(e["loc"]), "msg": e["msg"].removeprefix("Value error, "),
             "type": e["type"]} for e in exc.errors(include_url=False, include_input=False)
        ]) from None
    return ExperimentSet(config)


def parse_text(text: str | bytes, fmt: str = "yaml") -> Any:
    """JSON or YAML text to data; a syntax error is an ExperimentConfigError."""
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ExperimentConfigError([{"loc": [], "msg": f"not valid {fmt.upper()}: {exc}",
                                      "type": "syntax"}]) from None
    except RecursionError:  # a config is a few levels deep; thousands are an attack or a bug
        raise ExperimentConfigError([{"loc": [], "msg": f"{fmt.upper()} nested too deeply",
                                      "type": "syntax"}]) from None


def load_experiments(path: Path, registry: Path | None) -> ExperimentSet:
    """Read and validate an experiments file (.json is JSON, anything else YAML)."""
    fmt = "json" if Path(path).suffix.lower() == ".json" else "yaml"
    return parse_experiments(parse_text(Path(path).read_text(), fmt), registry)


def single_arm(experiment: str, arm: str, bundle: str, canary: Canary | None = None
               ) -> ExperimentSet:
    """The set without an experiments file: one arm, served by the model loaded as `arm`
    (and its canary, if any, by the model loaded as `canary_key(arm)`)."""
    config = ExperimentsFile(experiments=[ExperimentConfig(
        name=experiment, salt=experiment,
        arms=[ArmConfig(name=arm, weight=1.0, bundle=bundle, control=True)])])
    if canary is None or canary.bundle == bundle:
        return ExperimentSet(config, keys={bundle: arm})
    return ExperimentSet(config, keys={bundle: arm, canary.bundle: canary_key(arm)},
                         canaries={(experiment, arm): canary})


def canary_key(arm: str) -> str:
    """The model key of an arm's canary without an experiments file."""
    return f"{arm}:canary"


def arm_canaries(config: ExperimentsFile, state: dict[str, dict[str, dict[str, Any]]]
                 ) -> Canaries:
    """The canaries of a deployment state ({experiment: {arm: {"bundle", "share"}}}) for the
    arms of `config`; one naming its arm's own bundle is ignored, a malformed one refused."""
    canaries: Canaries = {}
    for i, e in enumerate(config.experiments):
        for j, a in enumerate(e.arms):
            value = state.get(e.name, {}).get(a.name)
            if value is None:
                continue
            bundle, share = value.get("bundle"), value.get("share")
            if not isinstance(bundle, str) or not bundle or not canary_share_ok(share):
                raise ExperimentConfigError([{
                    "loc": ["experiments", i, "arms", j, "canary"], "type": "canary",
                    "msg": f"malformed canary {value!r} in the deployment state"}])
            if bundle != a.bundle:
                canaries[e.name, a.name] = Canary(bundle, float(share))
    return canaries


def _namespace_overlaps(experiments: list[ExperimentConfig]) -> list[str]:
    """Each pair of experiments whose ranges of one namespace overlap, named."""
    spaced = [(i, e, e.namespace) for i, e in enumerate(experiments) if e.namespace]
    problems = []
    for k, (i, a, na) in enumerate(spaced):
        for j, b, nb in spaced[k + 1:]:
            start, end = max(na.range[0], nb.range[0]), min(na.range[1], nb.range[1])
            if na.name == nb.name and start < end:
                problems.append(
                    f"experiments {a.name!r} (experiments.{i}, range {_span(*na.range)}) and "
                    f"{b.name!r} (experiments.{j}, range {_span(*nb.range)}) overlap in "
                    f"namespace {na.name!r} on {_span(start, end)}: ranges of one namespace "
                    "must not overlap")
    return problems


def _span(start: float, end: float) -> str:
    return f"[{start:g}, {end:g})"


def _namespace_salts(experiments: list[ExperimentConfig]) -> list[str]:
    """Experiments hashing with a namespace's salt: their arms would follow its buckets."""
    salts = {namespace_salt(e.namespace.name): e.namespace.name
             for e in experiments if e.namespace}
    return [f"experiment {e.name!r} (experiments.{i}) has the salt {e.salt!r} of namespace "
            f"{salts[e.salt]!r}; choose another salt" for i, e in enumerate(experiments)
            if e.salt in salts]


def _duplicates(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})
