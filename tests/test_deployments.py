"""Deployment state in Redis: `ctrserve deploy`/`rollback` against a running scorer."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ctrserve.cli import main
from service.deployments import HISTORY_KEY, VERSION_KEY, state_key
from service.feature_store import load_tables
from service.redis_server import embedded_url, start_embedded, stop_embedded
from service.settings import Settings
from tests.serving import LiveServer, copy_registry

BODY = {"user_id": "u1", "context": {"hour": 9, "weekday": 2},
        "candidates": [{"item_id": f"a{i:04d}"} for i in range(1, 9)]}


@pytest.fixture(scope="module")
def world(bundles, synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    registry = copy_registry(bundles, tmp / "registry", broken=True)
    db = tmp / "store.rdb"
    redis_server = start_embedded(db)
    load_tables(redis_server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    config = {"experiments": [{"name": "ranker", "salt": "r1", "arms": [
        {"name": "main", "weight": 1.0, "bundle": bundles["lr"].name, "control": True}]}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(redis_server), deploy_poll_s=0.2,
                        max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1)
    try:
        with LiveServer(settings) as live:
            yield {"server": live, "registry": registry, "db": db, "redis": redis_server,
                   "settings": settings}
    finally:
        stop_embedded(redis_server)


def version(registry: Path, name: str) -> str:
    return json.loads((registry / name / "manifest.json").read_text())["version"]


def cli(world: dict, *args: str) -> int:
    return main([*args, "--registry", str(world["registry"]), "--redis-db", str(world["db"])])


class Traffic:
    """Score requests from a few threads until stopped; records (time, status, version)."""

    def __init__(self, url: str, threads: int = 4):
        self.url, self.stop_flag = url, threading.Event()
        self.results: list[tuple[float, int, str]] = []
        self.threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop_flag.is_set():
                try:
                    r = client.post(self.url + "/v1/score", json=BODY)
                    served = r.json().get("model_version", "") if r.status_code == 200 else ""
                    self.results.append((time.monotonic(), r.status_code, served))
                except httpx.HTTPError:
                    self.results.append((time.monotonic(), 0, ""))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)

    def wait_for(self, served: str, timeout_s: float = 10.0) -> float:
        """Seconds until a request was answered by `served`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if any(v == served and t > start for t, _, v in self.results[-20:]):
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"{served} not served within {timeout_s} s")


def test_deploy_and_rollback_under_traffic_fail_no_request(world, bundles, capsys):
    url, registry = world["server"].url, world["registry"]
    lr, deepfm = bundles["lr"].name, bundles["deepfm"].name
    with Traffic(url) as traffic:
        time.sleep(0.3)
        assert cli(world, "deploy", "--experiment", "ranker", "--arm", "main", "--bundle",
                   deepfm, "--why", "better AUC") == 0
        record = json.loads(capsys.readouterr().out)
        assert (record["from"], record["to"], record["kind"]) == (lr, deepfm, "deploy")
        assert traffic.wait_for(version(registry, deepfm)) < 5
        time.sleep(0.3)
        assert cli(world, "rollback", "--experiment", "ranker", "--arm", "main", "--why",
                   "CTR dropped") == 0
        assert traffic.wait_for(version(registry, lr)) < 5
        time.sleep(0.3)
    statuses = [s for _, s, _ in traffic.results]
    assert len(statuses) > 50 and set(statuses) == {200}
    assert {v for _, _, v in traffic.results} == {version(registry, lr),
                                                  version(registry, deepfm)}
    served = httpx.get(url + "/v1/models").json()
    assert [m["version"] for m in served["models"]] == [version(registry, lr)]
    assert served["deployment"]["error"] is None and served["deployment"]["version"] >= 2


def test_a_bundle_failing_verification_is_refused_and_nothing_changes(world, capsys):
    client = world["redis"]
    before = (client.get(VERSION_KEY), client.hgetall(state_key("ranker")),
              client.llen(HISTORY_KEY))
    code = cli(world, "deploy", "--experiment", "ranker", "--arm", "main", "--bundle",
               "deepfm-broken")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "deepfm-broken: refused" in err
    assert "sha256" in err
    assert cli(world, "deploy", "--experiment", "ranker", "--arm", "nope", "--bundle",
               "deepfm-broken") == 2
    assert cli(world, "rollback", "--experiment", "other", "--arm", "main") == 2
    assert "no such deployed arm" in capsys.readouterr().err
    assert (client.get(VERSION_KEY), client.hgetall(state_key("ranker")),
            client.llen(HISTORY_KEY)) == before


def test_history_records_who_when_from_to_why_in_order(world, bundles, capsys):
    lr, deepfm = bundles["lr"].name, bundles["deepfm"].name
    assert cli(world, "deployments", "--experiment", "ranker", "--json") == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["from"], r["to"], r["why"]) for r in records] == [
        ("deploy", lr, deepfm, "better AUC"), ("rollback", deepfm, lr, "CTR dropped")]
    assert [r["version"] for r in records] == [1, 2]
    assert all(r["who"] and r["when"].endswith("+00:00") for r in records)
    assert records[0]["when"] <= records[1]["when"]
    assert cli(world, "deployments") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "rollback" in lines[1] and "(CTR dropped)" in lines[1]
    assert cli(world, "rollback", "--experiment", "ranker", "--arm", "main") == 2
    assert "no earlier bundle" in capsys.readouterr().err


def test_a_bundle_that_fails_to_load_keeps_the_old_one_serving(world, bundles):
    """State written around `ctrserve deploy` (another tool, a stale replica): refused."""
    url, client = world["server"].url, world["redis"]
    client.hset(state_key("ranker"), "main", "deepfm-broken")
    client.incr(VERSION_KEY)
    try:
        deadline = time.monotonic() + 5
        while not (error := httpx.get(url + "/v1/models").json()["deployment"]["error"]):
            assert time.monotonic() < deadline, "the refusal never showed"
            time.sleep(0.1)
        assert "deepfm-broken" in error and "keep serving" in error
        reply = httpx.post(url + "/v1/score", json=BODY)
        assert reply.status_code == 200
        assert reply.json()["model_version"] == version(world["registry"], bundles["lr"].name)
    finally:
        client.hset(state_key("ranker"), "main", bundles["lr"].name)
        client.incr(VERSION_KEY)


def test_a_state_in_redis_wins_over_the_file_at_start(world, bundles):
    client, registry = world["redis"], world["registry"]
    deepfm = bundles["deepfm"].name
    assert cli(world, "deploy", "--experiment", "ranker", "--arm", "main", "--bundle",
               deepfm) == 0
    with LiveServer(world["settings"]) as second:
        reply = httpx.post(second.url + "/v1/score", json=BODY).json()
        assert reply["model_version"] == version(registry, deepfm)
    assert client.hget(state_key("ranker"), "main").decode() == deepfm
