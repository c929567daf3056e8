"""Loaded models and their atomic hot swap.

A swap verifies, loads and warms the new bundle beside the old one (in a thread, while the old
keeps serving), warms its item cache with the items the old one had cached, then replaces the
arm's entry in one assignment on the event loop. Requests that already queued rows on the old
model's batcher finish there, on the old session; the old batcher then drains and stops.
A bundle that fails verification raises BundleError and nothing changes.

Models are kept by key (an arm's name without an experiments file, else the bundle's name);
their metrics are labelled by the bundle's name, whatever the key (service/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ctrserve.bundles import Bundle, BundleError, load_bundle
from ctrserve.bundles.registry import known_bundles
from ctrserve.service import heap
from ctrserve.service.batcher import Batcher, Runner
from ctrserve.service.encoding import RequestEncoder
from ctrserve.service.errors import NotReady
from ctrserve.service.feature_store import FeatureStore
from ctrserve.service.metrics import Metrics
from ctrserve.service.plan import FieldPlan, make_plan
from ctrserve.service.schemas import LoadedModelInfo
from ctrserve.service.settings import CPU, CUDA, Settings

log = logging.getLogger("ctrserve.models")
WARM_ITEMS_MAX = 50_000


@dataclass
class LoadedModel:
    arm: str
    bundle: Bundle
    plan: FieldPlan
    encoder: RequestEncoder
    batcher: Batcher
    loaded_at: str

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def name(self) -> str:
        """The bundle's name: the `bundle` label of this model's metrics."""
        return bundle_name(self.bundle.path)

    def labels(self) -> dict[str, str]:
        """The labels of its ctrserve_model_info series (metrics.MODEL_INFO_LABELS)."""
        return {"bundle": self.name, "version": self.version,
                "model_type": self.bundle.manifest.model_type,
                "providers": ",".join(self.bundle.session.get_providers())}

    def info(self) -> LoadedModelInfo:
        return LoadedModelInfo(arm=self.arm, version=self.version,
                               model_type=self.bundle.manifest.model_type,
                               bundle=str(self.bundle.path),
                               providers=self.bundle.session.get_providers(),
                               loaded_at=self.loaded_at, fields=self.plan.describe())


def bundle_name(path: Path) -> str:
    """A bundle's name: its directory's, as the registry lists it."""
    return path.name or path.resolve().name


def resolve_bundle(registry: Path, name: str, inside_registry: bool) -> Path:
    """A bundle name in the registry, or a path (inside the registry when `inside_registry`)."""
    path = registry / name if (registry / name).is_dir() else Path(name)
    if not path.is_dir():
        raise BundleError(f"{name}: no such bundle in {registry} and no such directory; "
                          f"bundles: {known_bundles(registry)}")
    if inside_registry and not path.resolve().is_relative_to(registry.resolve()):
        raise BundleError(f"{name}: not inside the registry {registry}")
    return path


def providers_for(asked: list[str]) -> list[str]:
    """The asked providers that this onnxruntime has, CPU always last."""
    available = set(ort.get_available_providers())
    missing = [p for p in asked if p not in available]
    if missing:
        log.warning("execution providers %s are not available here; using %s", missing,
                    [p for p in asked if p in available] or [CPU])
    chosen = [p for p in asked if p in available and p != CPU]
    return [*chosen, CPU]


def make_runner(session: ort.InferenceSession) -> Runner:
    """Run one batch, returning one probability per row; CUDA binds through IOBinding."""
    output = session.get_outputs()[0].name
    if CUDA not in session.get_providers():
        return lambda feeds: session.run([output], feeds)[0].reshape(-1)

    def run_bound(feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(output, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].reshape(-1)

    return run_bound


def build_model(arm: str, path: Path, settings: Settings, metrics: Metrics,
                meta: dict[str, Any], warm_items: tuple[list[str], list[Any]]) -> LoadedModel:
    """Verify, load and warm a bundle (blocking; run it in a thread)."""
    bundle = load_bundle(path, providers=providers_for(settings.providers),
                         threads=settings.ort_threads)
    plan = make_plan(bundle.encoder, settings, meta)
    encoder = RequestEncoder(bundle.encoder, plan, settings)
    runner = make_runner(bundle.session)
    ids, records = warm_items
    if ids:
        encoder.items.put(ids, records, time.monotonic())
    warm_up(runner, encoder, settings)
    batcher = Batcher(runner, bundle_name(path), settings, metrics)
    loaded_at = datetime.now(UTC).isoformat(timespec="seconds")
    return LoadedModel(arm, bundle, plan, encoder, batcher, loaded_at)


def warm_up(runner: Runner, encoder: RequestEncoder, settings: Settings) -> None:
    """Run the session at the batch sizes it will see, so the first requests are not slow."""
    sizes = sorted({1, min(10, settings.max_candidates),
                    min(settings.batch_max_rows, settings.max_candidates)})
    shared = encoder.shared({})
    for n in sizes:
        items = encoder.encode_items([f"warmup-{i}" for i in range(n)], [None] * n)
        feeds = encoder.assemble(n, shared, items)
        for _ in range(settings.warmup_rounds):
            runner(feeds)


class ModelRegistry:
    """The loaded models, by key: the arm's name without an experiments file, else the bundle
    name (one model per distinct bundle, whichever arms and experiments it serves)."""

    def __init__(self, settings: Settings, metrics: Metrics, store: FeatureStore):
        self.settings, self.metrics, self.store = settings, metrics, store
        self.models: dict[str, LoadedModel] = {}
        self._lock = asyncio.Lock()

    def get(self, arm: str) -> LoadedModel:
        model = self.models.get(arm)
        if model is None:
            raise NotReady(["arm"], f"no model loaded for arm {arm!r}")
        return model

    async def load(self, arm: str, path: Path) -> None:
        """Load `path` for `arm`, replacing what it served."""
        async with self._lock:
            old = self.models.get(arm)
            meta = await self.store.meta()
            warm = await self._warm_items(old)
            try:
                new = await asyncio.to_thread(build_model, arm, path, self.settings,
                                              self.metrics, meta, warm)
            except BundleError:
                self.metrics.refused(bundle_name(path))
                raise
            new.batcher.start()
            self.models[arm] = new  # the swap: later requests pick the new model
            self.metrics.loaded(new.labels())
            if old is not None:
                self._retire(old)
        if old is not None:
            await old.batcher.close(self.settings.drain_timeout_s)
        log.info("arm %s serves %s (was %s)", arm, new.version, old.version if old else None)
        del old, new  # the retired model, unreferenced from here, can be collected
        self._resettle()

    async def unload(self, key: str) -> None:
        """Stop serving `key`: requests already queued on it finish first."""
        async with self._lock:
            model = self.models.pop(key, None)
            if model is None:
                return
            self._retire(model)
        if not await model.batcher.close(self.settings.drain_timeout_s):
            log.warning("%s: queue not drained within %.0f s", key, self.settings.drain_timeout_s)
        log.info("%s (%s) unloaded", key, model.version)
        del model
        self._resettle()

    def _resettle(self) -> None:
        """After a model change in a serving process: the retired model's cycles collected,
        and the heap, the new model's objects with it, frozen again (service/heap.py)."""
        frozen = heap.resettle()
        if frozen is not None:
            self.metrics.heap_frozen.set(frozen)

    def _retire(self, model: LoadedModel) -> None:
        """Drop the series of a model no longer served, except those another served model of
        the same bundle shares (a canary promoted without an experiments file is loaded under
        the arm's key before its canary key is unloaded)."""
        labels = model.labels()
        serving = list(self.models.values())
        if any(m.labels() == labels for m in serving):
            return
        self.metrics.drop_model(labels, queue=not any(m.name == model.name for m in serving))

    async def _warm_items(self, old: LoadedModel | None) -> tuple[list[str], list[Any]]:
        if old is None:
            return [], []
        ids = old.encoder.items.ids()[:WARM_ITEMS_MAX]
        return ids, await self.store.items(ids)

    async def close(self) -> None:
        for model in self.models.values():
            if not await model.batcher.close(self.settings.drain_timeout_s):
                log.warning("arm %s: queue not drained within %.0f s", model.arm,
                            self.settings.drain_timeout_s)
