"""Attribution that cannot be forged, event sanity and bounded state, over real HTTP.

A scorer on a real Debian redis-server (REDIS_URL), with known signing keys so that the tests
can also mint tokens the way an attacker holding an old or a wrong key would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from ctrserve.common.keys import TOTAL, arm_key, log_key, user_key
from ctrserve.service.attribution import Signer, parse_keys
from ctrserve.service.event_log import drain, read_log
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

ITEMS = [f"a{i:04d}" for i in range(1, 21)]
OLD, NEW = "k1:old-secret-0123456789", "k2:new-secret-9876543210"


@pytest.fixture(scope="module")
def registry(bundles, tmp_path_factory) -> Path:
    return copy_registry(bundles, tmp_path_factory.mktemp("attr-registry"), models=("lr",))


def settings(registry: Path, url: str, **extra) -> Settings:
    lr = next(p.name for p in registry.iterdir() if p.name.startswith("lr-"))
    return Settings(registry=registry, bundle=lr, experiment="attr", redis_url=url,
                    max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1, **extra)


@pytest.fixture(scope="module")
def server(registry, redis_server_url):
    """Signs with the new key, still verifies the old one (a rotation under way)."""
    with LiveServer(settings(registry, redis_server_url, attribution_keys=[NEW, OLD])) as s:
        yield s.url


@pytest.fixture
def client(redis_server_url):
    c = redis.Redis.from_url(redis_server_url)
    yield c
    c.close()


def score(url: str, user: str, items: list[str], **extra) -> dict:
    body = {"user_id": user, "candidates": [{"item_id": i} for i in items], **extra}
    reply = httpx.post(url + "/v1/score", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def impression(event_id: str, reply: dict, user: str, items=None, **extra) -> dict:
    shown = items or reply["item_ids"]
    return {"event_id": event_id, "type": "impression", "attribution": reply["attribution"],
            "user_id": user, "ts": time.time(),
            "items": [{"item_id": i, "position": p} for p, i in enumerate(shown, 1)], **extra}


def download(event_id: str, reply: dict, user: str, item: str, **extra) -> dict:
    return {"event_id": event_id, "type": "download", "attribution": reply["attribution"],
            "user_id": user, "item_id": item, "ts": time.time(), **extra}


def send(url: str, events: list[dict], **kw) -> httpx.Response:
    return httpx.post(url + "/v1/events", json={"events": events}, **kw)


def results(url: str, events: list[dict]) -> dict[str, dict]:
    reply = send(url, events)
    assert reply.status_code == 200, reply.text
    return {r["event_id"]: r for r in reply.json()["results"]}


def test_request_ids_are_random_and_a_reused_id_takes_nothing_over(server):
    ids = [score(server, "alice", ITEMS[:3])["request_id"] for _ in range(3)]
    assert len(set(ids)) == 3
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)  # 128 bits
    alice = score(server, "alice", ITEMS[:5], top_k=3)
    mallory = score(server, "mallory", ITEMS[10:13], request_id=alice["request_id"])
    only_alice = next(i for i in alice["item_ids"])
    out = results(server, [
        # mallory reuses alice's request id: her own token binds it to her, nothing of alice's
        download("m-steal", mallory, "mallory", only_alice),
        # alice's token with mallory's user id, and mallory's token claiming to be alice
        impression("m-as-alice-1", alice, "mallory"),
        impression("m-as-alice-2", mallory, "alice"),
        # alice is unaffected: her events are accepted in her arm
        impression("a-imp", alice, "alice"),
        download("a-dl", alice, "alice", alice["item_ids"][1]),
    ])
    assert out["m-steal"]["reason"] == "item_not_served"
    assert out["m-as-alice-1"]["reason"] == out["m-as-alice-2"]["reason"] == "user_mismatch"
    assert out["a-imp"]["status"] == out["a-dl"]["status"] == "accepted"


def test_forged_and_tampered_tokens_are_rejected_with_their_reason(server):
    reply = score(server, "bob", ITEMS[:4])
    kid, header, tags, mac = reply["attribution"].split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    fields[3] = "treatment"  # move the request to another arm
    other_arm = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    foreign = Signer(parse_keys(["k9:someone-elses-secret-000"])).issue(
        reply["request_id"], "attr", "control", reply["model_version"], "bob", time.time(),
        False, ITEMS[:4])
    wrong_secret = Signer(parse_keys(["k2:not-the-real-secret-000"])).issue(
        reply["request_id"], "attr", "control", reply["model_version"], "bob", time.time(),
        False, ITEMS[:4])
    cases = {
        "t-arm": f"{kid}.{other_arm}.{tags}.{mac}",
        "t-tags": f"{kid}.{header}.{tags[::-1]}.{mac}",
        "t-garbage": "not-a-token",
        "t-kid": foreign,
        "t-secret": wrong_secret,
    }
    out = results(server, [{**impression(k, reply, "bob"), "attribution": t}
                           for k, t in cases.items()])
    reasons = {k: out[k]["reason"] for k in cases}
    assert reasons == {"t-arm": "bad_signature", "t-tags": "bad_signature",
                       "t-garbage": "bad_token", "t-kid": "bad_token",
                       "t-secret": "bad_signature"}
    assert "k9" in out["t-kid"]["detail"]


def test_keys_rotate_without_downtime(server, registry, redis_server_url):
    """A token of the old key (a replica not yet rotated) is accepted by the rotated one."""
    with LiveServer(settings(registry, redis_server_url, attribution_keys=[OLD])) as old:
        reply = score(old.url, "carol", ITEMS[:3])
    assert reply["attribution"].startswith("k1.")
    assert results(server, [impression("rot-1", reply, "carol")])["rot-1"]["status"] == \
        "accepted"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def version_1_token(key: str, reply: dict, user: str, items: list[str]) -> str:
    """A token for `reply`'s request as scorers issued it before version 2 (a keyed BLAKE2b
    per item), made here from that format's definition."""
    kid, _, secret = key.partition(":")
    tag_key = hashlib.blake2b(secret.encode(), digest_size=64, person=b"ctrserve-tag").digest()
    salt = hashlib.blake2b(reply["request_id"].encode(), digest_size=16).digest()
    tags = b"".join(hashlib.blake2b(i.encode(), digest_size=4, key=tag_key, salt=salt).digest()
                    for i in items)
    day = time.strftime("%Y-%m-%d", time.gmtime(reply["ts"]))
    header = json.dumps([1, reply["request_id"], reply["experiment"], reply["arm"],
                         reply["model_version"], user, day, reply["ts"], 0]).encode()
    body = f"{kid}.{b64(header)}.{b64(tags)}"
    return f"{body}.{b64(hmac.new(secret.encode(), body.encode(), 'sha256').digest()[:16])}"


def test_tokens_of_the_previous_format_still_verify(server):
    """Tokens issued before an upgrade stay valid for their attribution window."""
    reply = score(server, "olga", ITEMS[:6], top_k=4)
    header = reply["attribution"].split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))[0] == 2
    old = {**reply, "attribution": version_1_token(NEW, reply, "olga", reply["item_ids"])}
    unserved = next(i for i in ITEMS[:6] if i not in reply["item_ids"])
    out = results(server, [impression("v1-imp", old, "olga"),
                           download("v1-dl", old, "olga", reply["item_ids"][2]),
                           download("v1-unserved", old, "olga", unserved)])
    assert out["v1-imp"]["status"] == out["v1-dl"]["status"] == "accepted"
    assert out["v1-unserved"]["reason"] == "item_not_served"


def test_tags_are_per_item_per_request_and_survive_the_digest_cache_starting_over(
        monkeypatch):
    signer = Signer(parse_keys([NEW, OLD]))
    kid, other_kid = NEW.split(":")[0], OLD.split(":")[0]
    items = [f"item-{i}" for i in range(50)]
    tags = signer.tags(kid, "req-1", items)
    assert len(tags) == 4 * len(items)
    # each item's tag alone is its slice of the list's: an event names items one by one
    assert all(signer.tags(kid, "req-1", [item]) == tags[4 * i: 4 * i + 4]
               for i, item in enumerate(items))
    assert signer.tags(kid, "req-2", items) != tags  # another request: other tags
    assert signer.tags(other_kid, "req-1", items) != tags  # another key: other tags
    assert signer.tags(kid, "req-1", items, version=1) != tags  # the earlier format
    monkeypatch.setattr("ctrserve.service.attribution.DIGESTS_KEPT", 10)
    for start in range(0, 200, 20):  # the item-digest cache starts over again and again
        signer.tags(kid, "req-3", [f"other-{i}" for i in range(start, start + 20)])
    assert signer.tags(kid, "req-1", items) == tags


def test_event_sanity_time_position_and_bounds(server):
    reply = score(server, "dave", ITEMS[:10], top_k=5)
    old = Signer(parse_keys([NEW])).issue("old-req", "attr", "control",
                                          reply["model_version"], "dave",
                                          time.time() - 2 * 86_400, False, ITEMS[:5])
    events = [
        impression("s-future", reply, "dave", ts="9999-12-31T00:00:00Z"),
        impression("s-past", reply, "dave", ts="2001-01-01T00:00:00Z"),
        {**impression("s-expired", reply, "dave"), "attribution": old},
        {**impression("s-pos", reply, "dave"),
         "items": [{"item_id": reply["item_ids"][0], "position": 6}]},
        {**impression("s-huge", reply, "dave"),
         "items": [{"item_id": reply["item_ids"][0], "position": 2147483648}]},
        impression("s-ok", reply, "dave"),
    ]
    out = results(server, events)
    assert {k: out[k]["reason"] for k in ("s-future", "s-past", "s-expired", "s-pos",
                                          "s-huge")} == {
        "s-future": "bad_ts", "s-past": "bad_ts", "s-expired": "expired",
        "s-pos": "bad_position", "s-huge": "malformed"}
    assert "position" in out["s-huge"]["detail"] and "5 item(s)" in out["s-pos"]["detail"]
    assert out["s-ok"]["status"] == "accepted"


def test_events_api_key(registry, redis_server_url):
    with LiveServer(settings(registry, redis_server_url, events_api_key="app-backend")) as s:
        reply = score(s.url, "erin", ITEMS[:3])
        event = impression("key-1", reply, "erin")
        refused = send(s.url, [event])
        assert refused.status_code == 401 and "X-API-Key" in refused.text
        assert send(s.url, [event], headers={"X-API-Key": "wrong"}).status_code == 401
        ok = send(s.url, [event], headers={"X-API-Key": "app-backend"})
        assert ok.status_code == 200 and ok.json()["accepted"] == 1


def test_only_proven_events_create_users_and_counts_expire(server, client):
    day = time.strftime("%Y-%m-%d", time.gmtime())
    x = arm_key("attr", day, "control", "x")
    score(server, "only-scored", ITEMS[:3])
    assert not client.hexists(x, "only-scored")
    reply = score(server, "frank", ITEMS[:3])
    assert results(server, [impression("u-1", reply, "frank")])["u-1"]["status"] == "accepted"
    assert client.hget(x, "frank") == b"3"
    assert client.hget(arm_key("attr", TOTAL, "control", "x"), "frank") == b"3"
    days = {part: client.ttl(arm_key("attr", day, "control", part)) / 86_400
            for part in ("x", "sums")}
    # the day's per-user hash lives while its events can come (the day, the 1-day window and
    # a day); its sums and the experiment's per-user totals for counts_retention_days=90
    assert 1 < days["x"] <= 3.01 and 89.9 < days["sums"] <= 91.01
    assert 89.9 < client.ttl(arm_key("attr", TOTAL, "control", "x")) / 86_400 <= 90.01


def test_nothing_per_request_stays_in_redis_once_drained(registry, redis_server_url, client,
                                                         tmp_path):
    """Keys do not grow with requests; the streams hold what was served until the drain."""
    serve = log_key("attr", "control", "serve")
    with LiveServer(settings(registry, redis_server_url)) as s:
        warm = score(s.url, "gina", ITEMS[:3])
        assert results(s.url, [impression("g-warm", warm, "gina")])["g-warm"]["status"] == \
            "accepted"
        drain(client, tmp_path / "warm")
        before = client.dbsize()
        replies = [score(s.url, f"g{n}", ITEMS[:5]) for n in range(40)]
        assert client.xlen(serve) >= 40
        out = send(s.url, [impression(f"g-{n}", r, f"g{n}") for n, r in enumerate(replies)])
        assert out.json()["accepted"] == 40
        # dedup buckets and count hashes are per arm and hour or day, not per request or
        # event: at most a new dedup bucket when the hour turns
        assert client.dbsize() - before <= 1
        moved = drain(client, tmp_path / "log")
    assert moved["served"] >= 40 and moved["events"] == 40
    assert client.xlen(serve) == 0 and client.xlen(log_key("attr", "control", "events")) == 0


def test_a_full_event_log_answers_503_and_loses_nothing(registry, redis_server_url, client,
                                                        tmp_path):
    drain(client, tmp_path / "before")
    with LiveServer(settings(registry, redis_server_url, max_log_entries=100)) as s:
        replies = [score(s.url, f"h{n}", ITEMS[:2]) for n in range(30)]
        events = [impression(f"full-{n}-{k}", r, f"h{n}") for n, r in enumerate(replies)
                  for k in range(4)]
        first = send(s.url, events)
        assert first.status_code == 503 and first.headers["Retry-After"]
        body = first.json()
        # the stream, drained before, stopped exactly at its bound
        assert client.xlen(log_key("attr", "control", "events")) == body["accepted"] == 100
        assert {r["reason"] for r in body["results"] if r["status"] == "rejected"} == \
            {"log_full"}
        drain(client, tmp_path / "log")
        again = send(s.url, events)
        assert again.status_code == 200
        assert again.json()["duplicate"] == body["accepted"]
        assert again.json()["accepted"] == len(events) - body["accepted"]
    drain(client, tmp_path / "log")
    logged = [r["event_id"] for r in read_log(tmp_path / "log").to_pylist()
              if r["event_id"].startswith("full-")]
    assert sorted(logged) == sorted(e["event_id"] for e in events)


def test_a_redis_that_lost_the_event_script_loads_it_again(server, client):
    """A restarted or new Redis node has no scripts: the events still count, exactly once."""
    reply = score(server, "ivy", ITEMS[:3])
    client.script_flush()
    out = results(server, [impression("ns-1", reply, "ivy"),
                           download("ns-2", reply, "ivy", reply["item_ids"][0])])
    assert out["ns-1"]["status"] == out["ns-2"]["status"] == "accepted"
    again = results(server, [impression("ns-1", reply, "ivy")])
    assert again["ns-1"]["status"] == "duplicate"


def test_a_redis_that_lost_the_serve_log_script_loads_it_again(server, client):
    """The serve-log appends share their round trips with the user reads: after a SCRIPT FLUSH
    each scored request is still answered and logged exactly once."""
    client.script_flush()
    replies = [score(server, "ivy", ITEMS[:3], request_id=f"noscript-{i}") for i in range(3)]
    logged = [json.loads(fields[b"r"])["request_id"]
              for _, fields in client.xrange(log_key("attr", "control", "serve"))]
    assert [logged.count(r["request_id"]) for r in replies] == [1, 1, 1]


def test_a_user_record_that_is_not_json_fails_its_request_only(server, client):
    """Concurrent user reads share a round trip: a corrupt record is that request's 500, and
    the requests read with it, and after it, are answered."""
    client.set(user_key("garbled"), b"\xff not json")
    with httpx.Client(base_url=server, timeout=10) as http, ThreadPoolExecutor(8) as pool:
        bodies = [{"user_id": user, "candidates": [{"item_id": i} for i in ITEMS[:3]]}
                  for user in ["garbled"] + [f"fine-{k}" for k in range(15)]]
        replies = list(pool.map(lambda body: http.post("/v1/score", json=body), bodies))
    assert [r.status_code for r in replies] == [500] + [200] * 15
    assert score(server, "fine-again", ITEMS[:3])["item_ids"]
