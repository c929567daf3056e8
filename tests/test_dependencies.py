"""The routes' typed dependencies (service/dependencies.py), through HTTP: GET /readyz before
the models are loaded, while they are and Redis answers, and once Redis is gone; a dependency
replaced through FastAPI's `dependency_overrides` is what the route uses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from ctrserve.loadtest.redis_servers import LocalRedis
from ctrserve.service.app import create_app
from ctrserve.service.dependencies import get_metrics
from ctrserve.service.metrics import Metrics
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry


def _get(app: object, path: str) -> httpx.Response:
    """One request to the app over ASGI, its lifespan not run (nothing loaded)."""

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://scorer") as client:
            return await client.get(path)

    return asyncio.run(get())


def test_readyz_is_503_naming_the_models_until_they_are_loaded() -> None:
    reply = _get(create_app(Settings()), "/readyz")
    assert reply.status_code == 503
    assert reply.json() == {"detail": [{"loc": ["models"], "msg": "models not loaded yet",
                                        "type": "not_ready"}]}


def test_readyz_names_the_served_models_then_redis_once_it_is_gone(bundles, redis_binaries,
                                                                   tmp_path: Path) -> None:
    registry = copy_registry(bundles, tmp_path / "registry", ("lr",))
    lr = bundles["lr"].name
    version = json.loads((registry / lr / "manifest.json").read_text())["version"]
    with LocalRedis(tmp_path / "redis") as redis_server:
        settings = Settings(registry=registry, bundle=lr, redis_url=redis_server.url,
                            warmup_rounds=1)
        with LiveServer(settings) as server:
            ready = httpx.get(server.url + "/readyz", timeout=10)
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready", "models": {"control": version}}
            redis_server.stop()
            gone = httpx.get(server.url + "/readyz", timeout=10)
            assert gone.status_code == 503
            (problem,) = gone.json()["detail"]
            assert (problem["loc"], problem["type"]) == (["redis"], "not_ready")
            assert problem["msg"].startswith("Redis does not answer: ")


def test_a_route_uses_the_dependency_it_is_given() -> None:
    """GET /metrics renders the Metrics its dependency returns (here another one than the
    app's own, through dependency_overrides), not whatever app.state holds."""
    app = create_app(Settings())
    other = Metrics()
    other.refused("lr-given")

    async def given() -> Metrics:
        return other

    app.dependency_overrides[get_metrics] = given
    text = _get(app, "/metrics").text
    assert 'ctrserve_swaps_total{bundle="lr-given",result="refused"} 1.0' in text
    del app.dependency_overrides[get_metrics]
    assert "lr-given" not in _get(app, "/metrics").text
