"""Events and counts over real HTTP: two scorer replicas on one real embedded Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import redis
import yaml

from ctrserve.cli import main
from ctrserve.common.keys import arm_key, log_key
from ctrserve.service.attribution import utc_day
from ctrserve.service.counts import build_report
from ctrserve.service.event_log import read_log, read_serve_log
from ctrserve.service.experiments.stats import ArmStats, report
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serve_process import ServeProcess
from tests.serving import LiveServer, copy_registry, metric_value
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
ITEMS = [f"a{i:04d}" for i in range(1, 21)]


@pytest.fixture(scope="module")
def registry(bundles, tmp_path_factory) -> Path:
    return copy_registry(bundles, tmp_path_factory.mktemp("events-registry"))


def config(registry: Path) -> dict:
    lr, deepfm = (next(p.name for p in registry.iterdir() if p.name.startswith(m + "-"))
                  for m in ("lr", "deepfm"))
    arms = [{"name": "lr", "weight": 0.5, "bundle": lr, "control": True},
            {"name": "deepfm", "weight": 0.5, "bundle": deepfm}]
    return {"experiments": [
        {"name": "ranker", "salt": "ranker-1", "arms": arms},
        {"name": "traffic", "salt": "traffic-1", "arms": arms, "holdout": 0.1},
    ]}


@pytest.fixture(scope="module")
def store(synth_dir, tmp_path_factory):
    server = start_embedded(tmp_path_factory.mktemp("events-redis") / "store.rdb")
    load_tables(server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    yield server
    stop_embedded(server)


@pytest.fixture(scope="module")
def replicas(registry, store, tmp_path_factory):
    """Two scorers sharing one Redis, as two replicas behind a load balancer would."""
    path = tmp_path_factory.mktemp("events-config") / "experiments.yaml"
    path.write_text(yaml.safe_dump(config(registry)))
    settings = Settings(registry=registry, experiments_file=path, redis_url=embedded_url(store),
                        max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1)
    with LiveServer(settings) as one, LiveServer(settings) as two:
        yield one.url, two.url


def score(url: str, user: str, items: list[str], **extra) -> dict:
    body = {"user_id": user, "context": {"hour": 9}, "candidates": [{"item_id": i} for i in items],
            **extra}
    reply = httpx.post(url + "/v1/score", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def impression(event_id: str, reply: dict, user: str, items: list[str] | None = None) -> dict:
    shown = items or reply["item_ids"]
    return {"event_id": event_id, "type": "impression", "request_id": reply["request_id"],
            "attribution": reply["attribution"], "user_id": user, "ts": time.time(),
            "items": [{"item_id": i, "position": p} for p, i in enumerate(shown, 1)]}


def download(event_id: str, reply: dict, user: str, item: str) -> dict:
    return {"event_id": event_id, "type": "download", "request_id": reply["request_id"],
            "attribution": reply["attribution"], "user_id": user, "item_id": item,
            "ts": time.time() + 1}


def send(url: str, events: list[dict]) -> dict:
    reply = httpx.post(url + "/v1/events", json={"events": events})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_concurrent_duplicates_on_two_replicas_count_once(replicas, store):
    one, two = replicas
    reply = score(one, "u00001", ITEMS[:5], experiment="ranker")
    event = impression("dup-1", reply, "u00001")
    sums_key = arm_key("ranker", utc_day(reply["ts"]), reply["arm"], "sums")
    before = int(store.hget(sums_key, "impressions") or 0)

    async def deliver() -> list[dict]:
        async with httpx.AsyncClient(timeout=30) as client:
            posts = [client.post(url + "/v1/events", json={"events": [event]})
                     for url in [one, two] * 16]
            return [r.json() for r in await asyncio.gather(*posts)]

    replies = asyncio.run(deliver())
    statuses = sorted(r["results"][0]["status"] for r in replies)
    assert statuses.count("accepted") == 1 and statuses.count("duplicate") == 31
    assert int(store.hget(sums_key, "impressions")) - before == 5
    stream = log_key("ranker", reply["arm"], "events")
    logged = [e for _, e in store.xrange(stream) if json.loads(e[b"event"])["event_id"] == "dup-1"]
    assert len(logged) == 1


def test_rejections_carry_their_reasons_without_failing_the_batch(replicas):
    one, _ = replicas
    reply = score(one, "u00002", ITEMS[:4], experiment="ranker", top_k=3)
    served = reply["item_ids"]
    unserved = next(i for i in ITEMS[:4] if i not in served)
    events = [
        impression("r-ok", reply, "u00002", served[:2]),
        {**impression("r-unknown", reply, "u00002"), "request_id": "no-such-request"},
        impression("r-user", reply, "u00003"),
        impression("r-unserved", reply, "u00002", [unserved]),
        download("r-undl", reply, "u00002", unserved),
        {**impression("r-pos", reply, "u00002"), "items": [{"item_id": served[0],
                                                             "position": 0}]},
        {"event_id": "r-type", "type": "click", "request_id": "x", "user_id": "u", "ts": 1},
        {"type": "download", "request_id": "x", "user_id": "u", "item_id": "a", "ts": 1},
        "not an event",
        download("r-down-ok", reply, "u00002", served[1]),
    ]
    out = send(one, events)
    by_id = {r["event_id"]: r for r in out["results"] if r["event_id"]}
    assert (out["accepted"], out["duplicate"], out["rejected"]) == (2, 0, 8)
    assert by_id["r-ok"]["status"] == by_id["r-down-ok"]["status"] == "accepted"
    expected = {"r-unknown": "request_mismatch", "r-user": "user_mismatch",
                "r-unserved": "item_not_served", "r-undl": "item_not_served",
                "r-pos": "malformed", "r-type": "malformed"}
    for event_id, reason in expected.items():
        assert by_id[event_id]["reason"] == reason, by_id[event_id]
    assert unserved in by_id["r-unserved"]["detail"] and unserved in by_id["r-undl"]["detail"]
    assert "items.0.position" in by_id["r-pos"]["detail"]
    assert "event_id" in out["results"][7]["detail"] and out["results"][8]["reason"] == "malformed"
    # the rejected id is not used up: corrected, it is accepted
    fixed = send(one, [{**impression("r-user", reply, "u00002", served[2:])}])
    assert fixed["results"][0]["status"] == "accepted"


@pytest.mark.parametrize("body, field", [
    (b"not json", "body"), (b"{}", "events"), (b'{"events": []}', "events"),
    (b'{"events": {"a": 1}}', "events"), (b'{"events": [], "extra": 1}', "extra"),
])
def test_malformed_body_is_a_422_naming_the_field(replicas, body, field):
    reply = httpx.post(replicas[0] + "/v1/events", content=body)
    assert reply.status_code == 422
    assert any(field in map(str, d["loc"]) for d in reply.json()["detail"]), reply.json()


def test_download_is_attributed_to_the_arm_and_model_that_served(replicas, store):
    one, two = replicas
    seen = {}
    for n in range(40):
        user = f"u{n + 10:05d}"
        reply = score(one, user, ITEMS[:6], experiment="ranker")
        if reply["arm"] in seen:
            continue
        out = send(two, [impression(f"att-i-{user}", reply, user),
                         download(f"att-d-{user}", reply, user, reply["item_ids"][3])])
        assert [r["arm"] for r in out["results"]] == [reply["arm"]] * 2
        seen[reply["arm"]] = reply
    assert set(seen) == {"lr", "deepfm"}
    for arm, reply in seen.items():
        events = {json.loads(e[b"event"])["event_id"]: json.loads(e[b"claims"])
                  for _, e in store.xrange(log_key("ranker", arm, "events"))}
        served = {json.loads(e[b"r"])["request_id"]: json.loads(e[b"r"])
                  for _, e in store.xrange(log_key("ranker", arm, "serve"))}
        claims = next(c for c in events.values() if c["request_id"] == reply["request_id"])
        assert (claims["arm"], claims["model_version"]) == (arm, reply["model_version"])
        record = served[reply["request_id"]]
        assert (record["arm"], record["model_version"]) == (arm, reply["model_version"])
        assert record["items"] == reply["item_ids"] and record["features"]["hour"] == 9


def test_counts_prometheus_and_report_equal_the_accepted_events(replicas, store, tmp_path):
    """Skewed traffic with duplicates on the `traffic` experiment; every figure recomputed."""
    rng = np.random.default_rng(3)
    urls = list(replicas)
    before = [httpx.get(u + "/metrics").text for u in urls]
    scored: dict[str, str] = {}  # user -> arm (non-holdout)
    x: dict[str, int] = defaultdict(int)
    y: dict[str, int] = defaultdict(int)
    holdout_events = 0
    for n in range(150):
        user = f"u{int(rng.zipf(1.6)) % 300:05d}"
        items = list(rng.choice(ITEMS, size=8, replace=False))
        reply = score(urls[n % 2], user, items, experiment="traffic", top_k=5)
        shown = reply["item_ids"][: int(rng.integers(1, 6))]
        downloads = [download(f"t-d-{n}-{i}", reply, user, i) for i in shown
                     if rng.random() < 0.3]
        events = [impression(f"t-i-{n}", reply, user, shown), *downloads]
        events += [events[-1]] if rng.random() < 0.2 else []  # a duplicate delivery
        out = send(urls[(n + 1) % 2], events)
        assert out["rejected"] == 0
        if reply["holdout"]:
            holdout_events += out["accepted"]
            continue
        scored[user] = reply["arm"]
        x[user] += len(shown)
        y[user] += len(downloads)
    after = [httpx.get(u + "/metrics").text for u in urls]

    def total(name: str, arm: str) -> float:
        label = f'{name}{{arm="{arm}",experiment="traffic"}}'
        return sum(metric_value(a, label) - metric_value(b, label)
                   for a, b in zip(after, before, strict=True))

    expected = {}
    for arm in ("lr", "deepfm"):
        users = [u for u, a in scored.items() if a == arm]
        expected[arm] = ArmStats.from_user_arrays([x[u] for u in users], [y[u] for u in users])
        assert total("ctrserve_impressions_total", arm) == expected[arm].impressions
        assert total("ctrserve_downloads_total", arm) == expected[arm].downloads
        assert total("ctrserve_users_total", arm) == expected[arm].users
    assert holdout_events > 0
    direct = report(expected, "lr", {"lr": 0.5, "deepfm": 0.5})
    api = httpx.get(urls[0] + "/v1/experiments/traffic/report").json()
    assert api["total"] == direct
    assert len(api["days"]) == 1 and next(iter(api["days"].values())) == direct
    assert build_report(store, "traffic", "lr", {"lr": 0.5, "deepfm": 0.5})["total"] == direct
    assert httpx.get(urls[0] + "/v1/experiments/nope/report").status_code == 404


# ---- a scorer killed with SIGKILL, its redis-server too -----------------------------------
def _start(registry: Path, db: Path) -> ServeProcess:
    """A scorer on a port it binds itself (--port 0: no probe-then-bind race), ready."""
    lr = next(p.name for p in registry.iterdir() if p.name.startswith("lr-"))
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["CTRSERVE_REDIS_DB"] = str(db)
    server = ServeProcess(["--registry", str(registry), "--bundle", lr], env)
    try:
        server.wait_ready(90)
    except RuntimeError:
        server.close()
        raise
    return server


def _wait_gone(pid: int, timeout_s: float = 10) -> None:
    """Until the killed process is reaped (its pidfile and port are free for the restart)."""
    wait_until(lambda: not psutil.pid_exists(pid)
               or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               f"process {pid} gone", timeout_s, interval_s=0.02)


def _redis_pid(db: Path) -> int:
    settings = json.loads(db.with_name(db.name + ".settings").read_text())
    return int(Path(settings["pidfile"]).read_text().strip())


def test_acknowledged_events_survive_sigkill_of_scorer_and_redis(registry, tmp_path):
    db = tmp_path / "redis" / "store.rdb"
    server = _start(registry, db)
    acked = []
    try:
        url = server.url
        for n in range(30):
            reply = score(url, f"u{n:05d}", ITEMS[:3])
            out = send(url, [impression(f"k-{n}", reply, f"u{n:05d}"),
                             download(f"k-d-{n}", reply, f"u{n:05d}", ITEMS[0])])
            acked += [r["event_id"] for r in out["results"] if r["status"] == "accepted"]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        redis_pid = _redis_pid(db)
        os.kill(redis_pid, signal.SIGKILL)  # no SHUTDOWN SAVE: only the AOF has them
        _wait_gone(redis_pid)
        server.close()
        server = _start(registry, db)
        assert httpx.get(server.url + "/v1/experiments/default/report").json()["total"][
            "arms"]["control"]["downloads"] == 30
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
    finally:
        server.close()
    assert len(acked) == 60
    out = tmp_path / "log"
    assert main(["drain-events", "--redis-db", str(db), "--out", str(out), "--chunk", "25"]) == 0
    log = read_log(out).to_pylist()
    assert sorted(r["event_id"] for r in log) == sorted(acked)
    first = next(r for r in log if r["type"] == "impression")
    assert first["positions"] == [1, 2, 3] and first["arm"] == "control"
    served = {r["request_id"]: r for r in read_serve_log(out).to_pylist()}
    assert len(served) == 30
    record = served[first["request_id"]]
    assert record["items"] == ITEMS[:3] and json.loads(record["features"])["hour"] == 9
    # drained entries are gone from the streams; the report still reads the counts
    server = start_embedded(db)
    try:
        client = redis.Redis(unix_socket_path=server.socket_file)
        for kind in ("events", "serve"):
            assert client.xlen(log_key("default", "control", kind)) == 0
    finally:
        stop_embedded(server)
    assert main(["report", "--redis-db", str(db), "--experiment", "default"]) == 0


def test_the_serve_log_holds_exactly_its_bound_and_counts_what_it_drops(registry, store,
                                                                        tmp_path):
    """Concurrent requests past max_log_entries: every one is answered, the stream stops at
    its bound, and the drops are counted."""
    lr = next(p.name for p in registry.iterdir() if p.name.startswith("lr-"))
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"experiments": [{"name": "bounded", "salt": "b-1", "arms": [
        {"name": "only", "weight": 1.0, "bundle": lr, "control": True}]}]}))
    settings = Settings(registry=registry, experiments_file=path, redis_url=embedded_url(store),
                        max_candidates=50, max_log_entries=100, warmup_rounds=1,
                        admission=False)  # on a busy machine a request could be shed (503)
    with LiveServer(settings) as server, ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: score(server.url, f"bound-{i}", ITEMS[:5]),
                                range(130)))
        metrics = httpx.get(server.url + "/metrics").text
    assert len({r["request_id"] for r in replies}) == 130
    assert store.xlen(log_key("bounded", "only", "serve")) == 100
    assert metric_value(metrics, "ctrserve_serve_log_dropped_total") == 30
