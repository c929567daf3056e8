"""Which loaded model serves each arm: the experiment set at start, and its replacement.

At start every bundle named by an arm is verified, loaded and warmed (one model per distinct
bundle). A replacement loads and warms the bundles it adds beside the serving ones, switches the
set in one assignment, then unloads the bundles no arm names any more; requests already queued
on them finish there, and a request that had picked one but not yet queued starts over on the
new set. A bundle that fails to load refuses the whole replacement and nothing changes.

`follow` applies the deployment state in Redis (service/deployments.py) the same way: the
arms whose deployed bundle differs from the one they serve get it, everything else stays. An
arm's canary bundle is loaded and warmed beside the others before it takes its share of the
arm's users, and unloaded when no arm or canary names it any more. Without an experiments file
the one arm's canary is the model loaded as `control:canary` (the arm's name, ":canary").

A config put through `PUT /admin/experiments` is stored in Redis with the id of the `base` it
replaced (the experiments file's bytes, or the single bundle's settings); `follow` adopts a
stored config whose base is this scorer's own, so every worker process serves it and so does a
scorer restarted on the same file, while a changed file wins over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from ctrserve.bundles import BundleError
from ctrserve.service.counts import save_configs
from ctrserve.service.deployments import (
    CanaryState,
    DeployState,
    publish_config,
    record_swap,
    seed,
)
from ctrserve.service.experiments.config import (
    ExperimentConfigError,
    ExperimentSet,
    arm_canaries,
    canary_key,
    load_experiments,
    parse_experiments,
    single_arm,
)
from ctrserve.service.models import ModelRegistry, resolve_bundle
from ctrserve.service.settings import Settings

log = logging.getLogger("ctrserve.routing")


class Routing:
    def __init__(self, settings: Settings, models: ModelRegistry,
                 client: aioredis.Redis | None = None):
        self.settings, self.models, self.client = settings, models, client
        self.experiments: ExperimentSet | None = None
        # one arm from the settings (no experiments file, no config put since)
        self.single = settings.experiments_file is None
        self.base = base_id(settings)
        # the stored config served, if any, and the deployment version that stored it (an
        # older one, read before this scorer put a newer, is not adopted)
        self.config_id, self.config_version = "", 0
        self._lock = asyncio.Lock()

    async def start(self) -> ExperimentSet:
        """Load the experiments file (or the single bundle) and every model it names."""
        s = self.settings
        if s.experiments_file is None:
            await self.models.load(s.arm, resolve_bundle(s.registry, s.bundle, False))
            self._install(single_arm(s.experiment, s.arm, s.bundle))
        else:
            experiments = load_experiments(s.experiments_file, s.registry)
            await self._load_missing(experiments)
            self._install(experiments)
        await self._save(self.experiments)
        return self.experiments

    def stored_form(self, experiments: ExperimentSet) -> dict[str, Any]:
        """What PUT /admin/experiments stores for the other workers: the config, its id and
        the base it replaces."""
        config = experiments.config.model_dump(mode="json")
        text = json.dumps(config, sort_keys=True)
        return {"config": config, "id": hashlib.sha256(text.encode()).hexdigest(),
                "base": self.base}

    def names(self, stored: dict[str, Any] | None) -> list[str]:
        """The experiments whose deployment state to read: those served and those of a
        stored config this scorer would adopt."""
        served = [e.name for e in self.experiments.config.experiments]
        if not self._adoptable(stored):
            return served
        return list(dict.fromkeys([*served, *(e["name"] for e in stored["config"]
                                              ["experiments"])]))

    def _install(self, experiments: ExperimentSet) -> None:
        """Route by `experiments` from now on and export its arms' weights, in one step on the
        event loop (a scrape sees the old set or the new one)."""
        self.experiments = experiments
        self.models.metrics.set_arms(arm_weights(experiments))

    async def _save(self, experiments: ExperimentSet, seed_arms: bool = True) -> None:
        if self.client is not None:
            await save_configs(self.client, experiments)
            if seed_arms:
                await seed(self.client, arm_bundles(experiments))

    async def replace(self, new: ExperimentSet) -> list[str]:
        """Serve `new` from now on (PUT /admin/experiments) and store it with its arms' bundles
        in Redis, where the other workers follow it; returns the bundles it loaded."""
        stored = self.stored_form(new)
        async with self._lock:
            added = await self._replace(new, seed_arms=False)  # each arm recorded below
            self.single, self.config_id = False, stored["id"]
            if self.client is not None:
                self.config_version = await publish_config(
                    self.client, stored, arm_bundles(new), "PUT /admin/experiments")
            return added

    async def follow(self, state: DeployState, canaries: CanaryState | None = None,
                     stored: dict[str, Any] | None = None) -> bool:
        """Serve the deployed bundles of `state` ({experiment: {arm: bundle}}) and the canaries
        of `canaries` ({experiment: {arm: {"bundle", "share"}}}), over the `stored` config
        when it replaced this scorer's base; False when nothing differs. A bundle that fails
        raises ExperimentConfigError or BundleError and nothing changes."""
        async with self._lock:
            adopted = None
            if (self._adoptable(stored) and stored["id"] != self.config_id
                    and stored["version"] > self.config_version):
                adopted = parse_experiments(stored["config"], self.settings.registry)
            elif self.single:
                return await self._follow_single(state, canaries or {})
            base = adopted or self.experiments
            new = overlay(base, state, canaries or {}, self.settings.registry) or adopted
            if new is not None:
                await self._replace(new)
            if adopted is not None:
                self.single, self.config_id = False, stored["id"]
                self.config_version = stored["version"]
            return new is not None

    def _adoptable(self, stored: dict[str, Any] | None) -> bool:
        return stored is not None and stored.get("base") == self.base

    async def swap(self, experiment: str, arm: str, bundle: str) -> tuple[str, str]:
        """Serve `bundle` for `arm` of `experiment` (POST /admin/swap): the experiment set
        changes with the model, so what is listed is what is served; canaries stay. Recorded
        in the deployment state, which the other workers follow. Returns
        the (old, new) model versions. Raises UnknownArm, BundleError or
        ExperimentConfigError, and then nothing changes."""
        async with self._lock:
            current = self.experiments
            arms = [a.name for e in current.config.experiments if e.name == experiment
                    for a in e.arms]
            if arm not in arms:
                raise UnknownArm(f"unknown arm {arm!r}; the arms of experiment "
                                 f"{experiment!r} are {arms}")
            old = self.models.get(current.key(experiment, arm)).version
            state, canaries = {experiment: {arm: bundle}}, canary_state(current)
            if self.single:
                await self._follow_single(state, canaries)
            elif (new := overlay(current, state, canaries, self.settings.registry)) is not None:
                await self._replace(new)
            if self.client is not None:
                await record_swap(self.client, experiment, arm, bundle, "POST /admin/swap")
            return old, self.models.get(self.experiments.key(experiment, arm)).version

    async def _follow_single(self, state: DeployState, canaries: CanaryState) -> bool:
        s, current = self.settings, self.experiments
        if current is None:
            return False
        serving = current.config.experiments[0].arms[0].bundle
        bundle = state.get(s.experiment, {}).get(s.arm) or serving
        plain = single_arm(s.experiment, s.arm, bundle)
        canary = arm_canaries(plain.config, canaries).get((s.experiment, s.arm))
        old_canary = current.canaries.get((s.experiment, s.arm))
        if bundle == serving and canary == old_canary:
            return False
        if canary is not None and (old_canary is None or canary.bundle != old_canary.bundle):
            await self._load_single(canary_key(s.arm), canary.bundle)  # first: refused = no change
        if bundle != serving:
            await self._load_single(s.arm, bundle)
        new = single_arm(s.experiment, s.arm, bundle, canary)
        self._install(new)
        if canary is None and old_canary is not None:
            await self.models.unload(canary_key(s.arm))
        await self._save(new)
        return True

    async def _load_single(self, key: str, bundle: str) -> None:
        path = resolve_bundle(self.settings.registry, bundle, inside_registry=True)
        await self.models.load(key, path)

    async def _replace(self, new: ExperimentSet, seed_arms: bool = True) -> list[str]:
        added = await self._load_missing(new)
        old = self.experiments
        self._install(new)
        keep = set(new.keys.values())
        for key in (old.keys.values() if old else ()):
            if key not in keep:
                await self.models.unload(key)
        await self._save(new, seed_arms)
        log.info("experiments now %s (loaded %s)", [e.name for e in new.config.experiments],
                 added)
        return added

    async def _load_missing(self, experiments: ExperimentSet) -> list[str]:
        added: list[str] = []
        for name in experiments.bundles():
            key = experiments.keys[name]
            if key in self.models.models:
                continue
            try:
                path = resolve_bundle(self.settings.registry, name, inside_registry=True)
                await self.models.load(key, path)
            except BundleError as exc:
                for done in added:
                    await self.models.unload(done)
                raise ExperimentConfigError([{"loc": _bundle_loc(experiments, name),
                                              "msg": f"bundle refused: {exc}",
                                              "type": "bundle"}]) from None
            added.append(key)
        return added


def _bundle_loc(experiments: ExperimentSet, bundle: str) -> list[str | int]:
    for i, e in enumerate(experiments.config.experiments):
        for j, a in enumerate(e.arms):
            if a.bundle == bundle:
                return ["experiments", i, "arms", j, "bundle"]
    for i, e in enumerate(experiments.config.experiments):
        for j, a in enumerate(e.arms):
            canary = experiments.canaries.get((e.name, a.name))
            if canary is not None and canary.bundle == bundle:
                return ["experiments", i, "arms", j, "canary", "bundle"]
    return ["experiments"]


def base_id(settings: Settings) -> str:
    """What this scorer starts from: the experiments file's bytes, or the single arm's
    settings (a file that cannot be read here fails at start anyway)."""
    if settings.experiments_file is None:
        source = f"bundle:{settings.experiment}/{settings.arm}/{settings.bundle}".encode()
    else:
        try:
            source = Path(settings.experiments_file).read_bytes()
        except OSError:
            source = b""
    return hashlib.sha256(source).hexdigest()


def arm_bundles(experiments: ExperimentSet) -> DeployState:
    return {e.name: {a.name: a.bundle for a in e.arms} for e in experiments.config.experiments}


def arm_weights(experiments: ExperimentSet) -> dict[tuple[str, str, str], float]:
    """{(experiment, arm, control "true"/"false"): weight} of every configured arm."""
    return {(e.name, a.name, str(a.control).lower()): a.weight
            for e in experiments.config.experiments for a in e.arms}


class UnknownArm(LookupError):
    pass


def canary_state(experiments: ExperimentSet) -> CanaryState:
    return {e: {a: {"bundle": c.bundle, "share": c.share}}
            for (e, a), c in experiments.canaries.items()}


def overlay(experiments: ExperimentSet, state: DeployState, canaries: CanaryState,
            registry: Path) -> ExperimentSet | None:
    """`experiments` with each arm's bundle taken from `state` where it has one, and the arms'
    canaries from `canaries`; None when that changes nothing."""
    data = experiments.config.model_dump()
    changed = False
    for e in data["experiments"]:
        for a in e["arms"]:
            bundle = state.get(e["name"], {}).get(a["name"])
            if bundle and bundle != a["bundle"]:
                a["bundle"], changed = bundle, True
    new = parse_experiments(data, registry) if changed else experiments
    wanted = arm_canaries(new.config, canaries)
    if not changed and wanted == experiments.canaries:
        return None
    return ExperimentSet(new.config, canaries=wanted)
