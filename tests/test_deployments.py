"""Deployment state in Redis: `ctrserve deploy`/`rollback`/`promote` and canaries against a
running scorer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from ctrserve.cli import main
from ctrserve.common.keys import log_key
from ctrserve.service.deployments import HISTORY_KEY, VERSION_KEY, canary_state_key, state_key
from ctrserve.service.experiments.assignment import canary_bucket
from ctrserve.service.experiments.config import Canary, ExperimentSet, parse_experiments
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

BODY = {"user_id": "u1", "context": {"hour": 9, "weekday": 2},
        "candidates": [{"item_id": f"a{i:04d}"} for i in range(1, 9)]}


def start_world(tmp: Path, bundles: dict, synth_dir: Path, salt: str, arms: list[dict],
                models: tuple[str, ...], deploy_poll_s: float) -> Iterator[dict]:
    """A fresh world for one test: a registry of copies of the fixture bundles (and a broken
    DeepFM copy), its own embedded Redis holding the feature records and nothing deployed yet,
    and a scorer serving the experiment `ranker` with `arms`."""
    registry = copy_registry(bundles, tmp / "registry", models, broken=True)
    db = tmp / "store.rdb"
    redis_server = start_embedded(db)
    try:
        load_tables(redis_server, synth_dir / "users.parquet", synth_dir / "apps.parquet")
        config = {"experiments": [{"name": "ranker", "salt": salt, "arms": arms}]}
        (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
        settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                            redis_url=embedded_url(redis_server), deploy_poll_s=deploy_poll_s,
                            max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1)
        with LiveServer(settings) as live:
            yield {"server": live, "registry": registry, "db": db, "redis": redis_server,
                   "settings": settings}
    finally:
        stop_embedded(redis_server)


@pytest.fixture
def world(bundles, synth_dir, tmp_path):
    """One arm, `main`, serving LR; no deployment history."""
    yield from start_world(tmp_path, bundles, synth_dir, "r1", [
        {"name": "main", "weight": 1.0, "bundle": bundles["lr"].name, "control": True}],
        ("lr", "deepfm"), deploy_poll_s=0.2)


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

    def wait_for(self, served: str, count: int = 15, timeout_s: float = 60.0) -> None:
        """Until `count` requests sent from now on were answered by `served` (the deadline is
        generous: the scorer polls the state every 0.2 s, but the cores are shared)."""
        start = time.monotonic()
        while sum(1 for t, _, v in list(self.results) if v == served and t > start) < count:
            assert time.monotonic() - start < timeout_s, f"{served} not served in {timeout_s} s"
            time.sleep(0.02)

    def wait_count(self, count: int, timeout_s: float = 60.0) -> None:
        """Until `count` requests were answered (whatever by)."""
        start = time.monotonic()
        while len(self.results) < count:
            assert time.monotonic() - start < timeout_s, f"{count} requests not in {timeout_s} s"
            time.sleep(0.02)


def test_deploy_and_rollback_under_traffic_fail_no_request(world, bundles, capsys):
    url, registry = world["server"].url, world["registry"]
    lr, deepfm = bundles["lr"].name, bundles["deepfm"].name
    with Traffic(url) as traffic:
        traffic.wait_count(25)  # traffic on the first bundle
        assert cli(world, "deploy", "--experiment", "ranker", "--arm", "main", "--bundle",
                   deepfm, "--why", "better AUC") == 0
        record = json.loads(capsys.readouterr().out)
        assert (record["from"], record["to"], record["kind"]) == (lr, deepfm, "deploy")
        traffic.wait_for(version(registry, deepfm))
        assert cli(world, "rollback", "--experiment", "ranker", "--arm", "main", "--why",
                   "CTR dropped") == 0
        traffic.wait_for(version(registry, lr))
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
    assert cli(world, "deploy", "--experiment", "ranker", "--arm", "main", "--bundle",
               deepfm, "--why", "better AUC") == 0
    assert cli(world, "rollback", "--experiment", "ranker", "--arm", "main", "--why",
               "CTR dropped") == 0
    capsys.readouterr()
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
        deadline = time.monotonic() + 30
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


def served(url: str) -> tuple[str, list[tuple[str, str]]]:
    """(the version serving arm `main`, [(arm, bundle)] of experiment `ranker`)."""
    ranker = httpx.get(url + "/v1/experiments").json()["experiments"][0]
    main_arm = next(a for a in ranker["arms"] if a["name"] == "main")
    return main_arm["model_version"], [(a["name"], a["bundle"]) for a in ranker["arms"]]


def test_admin_changes_reach_the_other_scorers_and_outlive_a_restart(world, bundles, capsys):
    """A second scorer on the same Redis takes the admin requests (another worker or
    replica): the first follows each change, a version bump does not undo a swap, and a
    scorer restarted on the same file keeps the config put, one on a changed file serves it."""
    lr, deepfm = bundles["lr"].name, bundles["deepfm"].name
    other, registry = world["server"].url, world["registry"]
    key = {"X-API-Key": "a" * 16}
    with LiveServer(world["settings"].model_copy(update={"admin_api_key": "a" * 16})) as admin:
        swap = httpx.post(admin.url + "/admin/swap", json={"bundle": deepfm}, headers=key,
                          timeout=60)
        assert swap.status_code == 200, swap.text
        world["redis"].incr(VERSION_KEY)  # an unrelated change: the swap is the state now
        for url in (other, admin.url):
            applied(world, url)
            assert served(url)[0] == version(registry, deepfm)
        config = {"experiments": [{"name": "ranker", "salt": "r1", "arms": [
            {"name": "main", "weight": 0.5, "bundle": lr, "control": True},
            {"name": "alt", "weight": 0.5, "bundle": deepfm}]}]}
        put = httpx.put(admin.url + "/admin/experiments", json=config, headers=key, timeout=60)
        assert put.status_code == 200, put.text
        applied(world)
        assert served(other)[1] == [("main", lr), ("alt", deepfm)]
    capsys.readouterr()
    assert cli(world, "deployments", "--experiment", "ranker", "--json") == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["arm"], r["from"], r["to"], r["who"]) for r in records] == [
        ("swap", "main", lr, deepfm, "POST /admin/swap"),
        ("config", "main", deepfm, lr, "PUT /admin/experiments"),
        ("config", "alt", "", deepfm, "PUT /admin/experiments")]
    with LiveServer(world["settings"]) as restarted:  # the same file: the config put
        assert served(restarted.url)[1] == [("main", lr), ("alt", deepfm)]
    changed = {"experiments": [{"name": "ranker", "salt": "r2", "arms": [
        {"name": "main", "weight": 1.0, "bundle": lr, "control": True}]}]}
    world["settings"].experiments_file.write_text(yaml.safe_dump(changed))
    with LiveServer(world["settings"]) as edited:  # a changed file wins over it
        ranker = httpx.get(edited.url + "/v1/experiments").json()["experiments"][0]
        assert (ranker["salt"], [a["name"] for a in ranker["arms"]]) == ("r2", ["main"])


# ---- canaries ------------------------------------------------------------------------------
USERS = [f"canary-user-{i:03d}" for i in range(400)]
SALT = "c1"


@pytest.fixture
def canary_world(bundles, synth_dir, tmp_path):
    """Two arms (control: LR, deepfm: DeepFM) whose deepfm arm gets FM canaries; no canary
    and no deployment history yet."""
    names = {m: bundles[m].name for m in ("lr", "deepfm", "fm")}
    for world in start_world(tmp_path, bundles, synth_dir, SALT, [
            {"name": "control", "weight": 0.5, "bundle": names["lr"],
             "control": True},
            {"name": "deepfm", "weight": 0.5, "bundle": names["deepfm"]}],
            ("lr", "deepfm", "fm"), deploy_poll_s=0.1):
        yield {**world, "names": names,
               "versions": {m: version(world["registry"], n) for m, n in names.items()}}


def applied(world: dict, url: str | None = None) -> dict:
    """Wait until the scorer has seen the deployment state's version; its status."""
    target = int(world["redis"].get(VERSION_KEY) or 0)
    deadline = time.monotonic() + 10
    while (status := httpx.get((url or world["server"].url) + "/v1/models").json()
           ["deployment"])["version"] < target:
        assert time.monotonic() < deadline, f"deployment version {target} never applied"
        time.sleep(0.05)
    return status


def scored(url: str, users: list[str]) -> dict[str, dict]:
    """user -> the score reply for that user (two candidates)."""
    body = {"context": {"hour": 9, "weekday": 2},
            "candidates": [{"item_id": "a0001"}, {"item_id": "a0002"}]}
    with httpx.Client(base_url=url, timeout=10) as client:
        replies = {u: client.post("/v1/score", json={**body, "user_id": u}) for u in users}
    assert {r.status_code for r in replies.values()} == {200}
    return {u: r.json() for u, r in replies.items()}


def canary_users(world: dict, replies: dict[str, dict]) -> set[str]:
    """The deepfm arm's users served by the FM canary; the others get their arm's bundle."""
    v = world["versions"]
    arm_version = {"control": v["lr"], "deepfm": v["deepfm"]}
    for user, r in replies.items():
        assert r["model_version"] in (arm_version[r["arm"]], v["fm"] if r["arm"] == "deepfm"
                                      else None), (user, r)
    return {u for u, r in replies.items() if r["model_version"] == v["fm"]}


def canary_cli(world: dict, *args: str) -> int:
    return cli(world, *args[:1], "--experiment", "ranker", "--arm", "deepfm", *args[1:])


def with_canary(world: dict, capsys, *shares: float) -> None:
    """Deploy the FM canary to the deepfm arm at each share in turn; wait until applied."""
    for share in shares:
        assert canary_cli(world, "deploy", "--bundle", world["names"]["fm"], "--canary",
                          str(share)) == 0
    applied(world)
    capsys.readouterr()


def test_a_canary_serves_its_share_of_the_arm_stably_and_is_attributed(canary_world, capsys):
    world, url = canary_world, canary_world["server"].url
    fm, deepfm, v = world["names"]["fm"], world["names"]["deepfm"], world["versions"]
    assert canary_cli(world, "deploy", "--bundle", fm, "--canary", "0.3") == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["kind"], record["from"], record["to"], record["share"]) == (
        "canary", deepfm, fm, 0.3)
    assert applied(world)["error"] is None
    arms = httpx.get(url + "/v1/experiments").json()["experiments"][0]["arms"]
    assert arms[0]["canary"] is None
    assert arms[1]["canary"] == {"bundle": fm, "share": 0.3, "model_version": v["fm"]}
    assert arms[1]["model_version"] == v["deepfm"]

    replies = scored(url, USERS)
    arm_users = [u for u, r in replies.items() if r["arm"] == "deepfm"]
    canary = canary_users(world, replies)
    assert len(arm_users) > 150 and 0.2 <= len(canary) / len(arm_users) <= 0.4
    # the documented hash decides, independently of the arm assignment
    assert canary == {u for u in arm_users if canary_bucket(SALT, "deepfm", u) < 3000}
    again = scored(url, USERS[:100])
    assert all(again[u]["model_version"] == replies[u]["model_version"] for u in again)

    user = sorted(canary)[0]
    served = (json.loads(f[b"r"]) for _, f in world["redis"].xrange(
        log_key("ranker", "deepfm", "serve")))
    stored = next(r for r in served if r["request_id"] == replies[user]["request_id"])
    assert (stored["arm"], stored["model_version"]) == ("deepfm", v["fm"])
    qa = httpx.get(url + "/v1/assignment", params={"user_id": user}).json()
    assert qa["canary"] is True and qa["model_version"] == v["fm"]
    assert f'version="{v["fm"]}"' in httpx.get(url + "/metrics").text


def test_raising_the_share_keeps_the_earlier_canary_users(canary_world, capsys):
    world, url, fm = canary_world, canary_world["server"].url, canary_world["names"]["fm"]
    with_canary(world, capsys, 0.3)
    before = canary_users(world, scored(url, USERS))
    assert before
    assert canary_cli(world, "deploy", "--bundle", fm, "--canary", "0.6") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["share"] == 0.6 and record["replaced"] == {"bundle": fm, "share": 0.3}
    applied(world)
    replies = scored(url, USERS)
    after = canary_users(world, replies)
    arm_users = [u for u, r in replies.items() if r["arm"] == "deepfm"]
    assert before < after and 0.5 <= len(after) / len(arm_users) <= 0.7


def test_promote_serves_the_canary_to_the_whole_arm_and_rollback_returns(canary_world, capsys):
    world, url, v = canary_world, canary_world["server"].url, canary_world["versions"]
    fm, deepfm = world["names"]["fm"], world["names"]["deepfm"]
    with_canary(world, capsys, 0.3, 0.6)
    assert canary_cli(world, "promote", "--why", "canary looks fine") == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["kind"], record["from"], record["to"], record["share"]) == (
        "promote", deepfm, fm, 0.6)
    applied(world)
    replies = scored(url, USERS)
    assert {r["model_version"] for r in replies.values() if r["arm"] == "deepfm"} == {v["fm"]}
    assert httpx.get(url + "/v1/experiments").json()["experiments"][0]["arms"][1][
        "canary"] is None
    assert canary_cli(world, "rollback") == 0
    assert json.loads(capsys.readouterr().out)["to"] == deepfm
    applied(world)
    replies = scored(url, USERS)
    assert {r["model_version"] for r in replies.values() if r["arm"] == "deepfm"} == {
        v["deepfm"]}
    assert cli(world, "deployments") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["canary", "canary", "promote", "rollback"]
    assert "(canary at 30%)" in lines[0] and "was " + fm + " at 30%" in lines[1]
    assert "(canary at 60% promoted)" in lines[2]


def test_rollback_during_a_canary_removes_only_the_canary(canary_world, capsys):
    world, url, v = canary_world, canary_world["server"].url, canary_world["versions"]
    fm, deepfm, lr = (world["names"][m] for m in ("fm", "deepfm", "lr"))
    client = world["redis"]
    assert canary_cli(world, "deploy", "--bundle", fm, "--canary", "0.3") == 0
    applied(world)
    assert canary_users(world, scored(url, USERS[:100]))
    assert cli(world, "deployments", "--experiment", "ranker") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"canary   ranker/deepfm: {fm} serves 30% of the arm's users ({deepfm} the rest)")
    assert canary_cli(world, "rollback", "--why", "errors") == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["kind"], record["from"], record["to"], record["share"]) == (
        "rollback", fm, deepfm, 0.3)
    assert client.hget(state_key("ranker"), "deepfm").decode() == deepfm
    assert not client.hgetall(canary_state_key("ranker"))
    applied(world)
    assert not canary_users(world, scored(url, USERS))
    assert v["fm"] not in {m["version"] for m in httpx.get(url + "/v1/models").json()["models"]}
    # a plain deploy ends a canary; rollback then returns to the arm's bundle before it
    assert canary_cli(world, "deploy", "--bundle", fm, "--canary", "0.3") == 0
    capsys.readouterr()
    assert canary_cli(world, "deploy", "--bundle", lr) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["ended_canary"] == {"bundle": fm, "share": 0.3}
    assert not client.hgetall(canary_state_key("ranker"))
    assert canary_cli(world, "rollback") == 0
    assert client.hget(state_key("ranker"), "deepfm").decode() == deepfm
    applied(world)


def test_bad_canaries_and_a_promote_without_canary_are_refused(canary_world, capsys):
    world, client = canary_world, canary_world["redis"]
    fm, deepfm = world["names"]["fm"], world["names"]["deepfm"]

    def snapshot() -> tuple:
        return (client.get(VERSION_KEY), client.hgetall(state_key("ranker")),
                client.hgetall(canary_state_key("ranker")), client.llen(HISTORY_KEY))

    before = snapshot()
    for share in ("0", "1", "1.5", "-0.1", "nan"):
        assert canary_cli(world, "deploy", "--bundle", fm, "--canary", share) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--canary {float(share)!r} is out of range" in err
    refusals = [(("promote",), "ranker/deepfm: no canary to promote"),
                (("deploy", "--bundle", deepfm, "--canary", "0.5"), "a canary needs another"),
                (("deploy", "--bundle", "deepfm-broken", "--canary", "0.5"), "refused")]
    for args, words in refusals:
        assert canary_cli(world, *args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err
    assert cli(world, "promote", "--experiment", "ranker", "--arm", "nope") == 2
    assert "ranker/nope: no such deployed arm" in capsys.readouterr().err
    assert snapshot() == before


def test_a_canary_that_fails_to_load_is_refused_and_nothing_changes(canary_world):
    """State written around `ctrserve deploy`: the scorer refuses it, the arm keeps serving."""
    world, url, client = canary_world, canary_world["server"].url, canary_world["redis"]
    client.hset(canary_state_key("ranker"), "deepfm",
                json.dumps({"bundle": "deepfm-broken", "share": 0.5}))
    client.incr(VERSION_KEY)
    try:
        error = applied(world)["error"]
        assert "deepfm-broken" in error and "keep serving" in error
        assert not canary_users(world, scored(url, USERS[:100]))
        assert httpx.get(url + "/v1/experiments").json()["experiments"][0]["arms"][1][
            "canary"] is None
    finally:
        client.hdel(canary_state_key("ranker"), "deepfm")
        client.incr(VERSION_KEY)
    assert applied(world)["error"] is None


def test_a_canary_without_an_experiments_file(canary_world, capsys):
    """One arm (`default`/`control`) served by the model loaded as the arm; its canary too."""
    world, v = canary_world, canary_world["versions"]
    settings = world["settings"].model_copy(update={"experiments_file": None,
                                                    "bundle": world["names"]["lr"]})
    with LiveServer(settings) as single:
        assert cli(world, "deploy", "--experiment", "default", "--arm", "control", "--bundle",
                   world["names"]["fm"], "--canary", "0.5") == 0
        applied(world, single.url)
        served = {r["model_version"] for r in scored(single.url, USERS[:100]).values()}
        assert served == {v["lr"], v["fm"]}
        assert cli(world, "promote", "--experiment", "default", "--arm", "control") == 0
        applied(world, single.url)
        served = {r["model_version"] for r in scored(single.url, USERS[:100]).values()}
        assert served == {v["fm"]}
        keys = {m["arm"] for m in httpx.get(single.url + "/v1/models").json()["models"]}
        assert keys == {"control"}
    capsys.readouterr()


def test_canary_users_grow_with_the_share_and_exclude_the_holdout():
    data = {"experiments": [{"name": "e", "salt": "s", "holdout": 0.1, "arms": [
        {"name": "a", "weight": 0.5, "bundle": "b1", "control": True},
        {"name": "b", "weight": 0.5, "bundle": "b2"}]}]}
    plain = parse_experiments(data, None)
    users = [f"u{i}" for i in range(4000)]

    def canary_of(share: float) -> set[str]:
        exps = ExperimentSet(plain.config, canaries={("e", "a"): Canary("b3", share)})
        assigned = {u: exps.assign(None, u) for u in users}
        assert all(not a.canary for a, _ in assigned.values() if a.holdout or a.arm == "b")
        assert all((key == "b3") == a.canary for a, key in assigned.values())
        return {u for u, (a, _) in assigned.items() if a.canary}

    small, large = canary_of(0.1), canary_of(0.4)
    arm_a = sum(1 for u in users if plain.assign(None, u)[0].arm == "a"
                and not plain.assign(None, u)[0].holdout)
    assert small < large and 0.07 < len(small) / arm_a < 0.13 and 0.35 < len(large) / arm_a < 0.45
