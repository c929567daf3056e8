"""A model field the request leaves out: listed and counted by default, a 422 under
strict_fields (issue 15: leaving a context field out moved a score 400-fold with a silent 200)."""

from __future__ import annotations

import httpx
import pytest

from ctrserve.service.settings import Settings
from tests.serving import LiveServer, World, copy_registry, metric_value


@pytest.fixture
def start(bundles, synth_dir, redis_server_url, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry", models=("deepfm",))

    def scorer(**overrides) -> LiveServer:
        return LiveServer(Settings(registry=registry, bundle=bundles["deepfm"].name,
                                   redis_url=redis_server_url, load_features=synth_dir,
                                   fill_clock=False, warmup_rounds=1, **overrides))
    return scorer


def body(world: World, **extra) -> dict:
    user = sorted(world.users)[0]
    return {"user_id": user, "candidates": [{"item_id": a} for a in sorted(world.apps)[:5]],
            **extra}


def context_fields(url: str) -> list[str]:
    return httpx.get(url + "/v1/models").json()["models"][0]["fields"]["context"]


def test_a_missing_field_is_listed_in_the_reply_and_counted(start, synth_dir):
    world = World(synth_dir)
    with start() as live:
        context = context_fields(live.url)
        assert {"hour", "weekday"} <= set(context)
        bare = httpx.post(live.url + "/v1/score", json=body(world))
        assert bare.status_code == 200 and bare.json()["missing_fields"] == context
        full = httpx.post(live.url + "/v1/score",
                          json=body(world, context={f: 1 for f in context}))
        assert full.status_code == 200 and full.json()["missing_fields"] == []
        assert full.json()["scores"] != bare.json()["scores"]
        metrics = httpx.get(live.url + "/metrics").text
        for name in context:
            assert metric_value(metrics, f'ctrserve_missing_fields_total{{field="{name}"}}') == 1


def test_strict_fields_refuses_naming_the_missing_fields(start, synth_dir):
    world = World(synth_dir)
    with start(strict_fields=True) as live:
        context = context_fields(live.url)
        reply = httpx.post(live.url + "/v1/score", json=body(world))
        assert reply.status_code == 422
        detail = reply.json()["detail"][0]
        assert detail["loc"] == ["body", "context"]
        assert all(repr(name) in detail["msg"] for name in context)
        ok = httpx.post(live.url + "/v1/score", json=body(world, context={f: 2 for f in context}))
        assert ok.status_code == 200 and ok.json()["missing_fields"] == []
