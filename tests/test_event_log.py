"""The drainer: bad entries go to dead letters without stopping it; --follow runs until SIGTERM.

Against a real Debian redis-server, with entries written the way the scorer writes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from ctrserve.common.keys import LOGS_KEY, log_key
from ctrserve.service.event_log import drain, read_log, read_serve_log

REPO = Path(__file__).resolve().parents[1]


def served(rid: str, day: str = "2026-11-20") -> dict[str, bytes]:
    record = {"request_id": rid, "ts": 1_795_000_000.0, "day": day, "client_ts": None,
              "experiment": "dl", "arm": "a", "model_version": "v1", "user": "u1",
              "holdout": False, "items": ["i1", "i2"], "features": {"hour": 3},
              "item_features": {}}
    return {"r": json.dumps(record).encode()}


def event(eid: str, position: int = 1) -> dict[str, bytes]:
    body = {"event_id": eid, "type": "impression", "request_id": "r1", "user_id": "u1",
            "ts": "2026-11-20T10:00:00Z", "items": [{"item_id": "i1", "position": position}]}
    claims = {"request_id": "r1", "experiment": "dl", "arm": "a", "model_version": "v1",
              "user": "u1", "day": "2026-11-20", "ts": 1_795_000_000.0, "holdout": False}
    return {"event": json.dumps(body).encode(), "claims": json.dumps(claims).encode()}


@pytest.fixture
def client(own_redis_url):
    c = redis.Redis.from_url(own_redis_url)
    c.sadd(LOGS_KEY, *(log_key("dl", "a", kind) for kind in ("events", "serve")))
    yield c
    c.close()


def test_a_bad_entry_goes_to_the_dead_letters_and_the_drain_moves_on(client, tmp_path):
    events, serve = log_key("dl", "a", "events"), log_key("dl", "a", "serve")
    client.xadd(events, event("e1"))
    client.xadd(events, event("e-huge", position=2**40))  # int32 column: Arrow refuses it
    client.xadd(events, {"event": b"{not json"})
    client.xadd(events, event("e2"))
    client.xadd(serve, served("r1"))
    client.xadd(serve, {"r": b"{\"request_id\": \"r2\"}"})  # most fields missing
    out = drain(client, tmp_path / "log")
    assert (out["events"], out["served"], out["dead_letters"]) == (4, 2, 3)
    assert out["left"] == {"events": 0, "serve": 0}
    assert sorted(r["event_id"] for r in read_log(tmp_path / "log").to_pylist()) == ["e1", "e2"]
    assert [r["request_id"] for r in read_serve_log(tmp_path / "log").to_pylist()] == ["r1"]
    dead_dir = tmp_path / "log" / "dead-letter"
    dead = [json.loads(line) for line in (dead_dir / "events-dl-a.jsonl").read_text()
            .splitlines()]
    reasons = {d["reason"].split(":")[0]: d for d in dead}
    assert sorted(reasons) == ["arrow", "unreadable entry"]
    assert json.loads(reasons["arrow"]["fields"]["event"])["event_id"] == "e-huge"
    assert "unreadable entry" in (dead_dir / "serve-dl-a.jsonl").read_text()
    # the next drain starts clean
    client.xadd(events, event("e3"))
    assert drain(client, tmp_path / "log")["events"] == 1


def test_follow_drains_as_entries_come_and_stops_on_sigterm(client, own_redis_url, tmp_path):
    env = {**os.environ, "REDIS_URL": own_redis_url}
    cmd = [sys.executable, "-m", "ctrserve", "drain-events", "--follow", "--out",
           str(tmp_path / "log"), "--interval", "0.1"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for n in range(3):
            client.xadd(log_key("dl", "a", "events"), event(f"f{n}"))
            client.xadd(log_key("dl", "a", "serve"), served(f"fr{n}"))
        deadline = time.monotonic() + 30
        while len(read_log(tmp_path / "log")) < 3 or len(read_serve_log(tmp_path / "log")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    totals = json.loads(stdout)
    assert (totals["events"], totals["served"]) == (3, 3) and totals["passes"] >= 1
    assert "drained" in stderr


def test_a_drain_that_cannot_write_exits_2_in_one_line_and_keeps_the_entries(client, own_redis_url,
                                                                              tmp_path):
    client.xadd(log_key("dl", "a", "events"), event("kept"))
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "log"  # mkdir fails as on a read-only mount (tests run as root)
    proc = subprocess.run([sys.executable, "-m", "ctrserve", "drain-events", "--out", str(out)],
                          env={**os.environ, "REDIS_URL": own_redis_url}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "cannot write the logs" in proc.stderr and "stay in Redis" in proc.stderr
    assert client.xlen(log_key("dl", "a", "events")) == 1
