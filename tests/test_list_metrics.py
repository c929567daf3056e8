"""The list metrics and the user-level sums of sql/, on small hand-built Parquet logs whose
answers are known, and against a brute force over every pair of users on a random log; then
the drainer's recompute of them (stored for `ctrserve report`, the API and the dashboard) from
log entries in a real redis-server: every drain, `--follow`, and without DuckDB.

The whole path on a live scorer's traffic: tests/test_warehouse.py (the API report against
`ctrserve list-metrics`) and tests/test_dashboard.py (the page)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from ctrserve.cli import main
from ctrserve.common.keys import LOGS_KEY, lists_key, log_key
from ctrserve.service.event_log import SCHEMAS, drain, read_serve_log
from ctrserve.service.experiments.list_metrics import list_metrics
from ctrserve.service.experiments.stats import ArmStats
from ctrserve.service.experiments.warehouse import arm_sums, open_logs
from tests.waiting import wait_until

DAY, DAY2 = "2026-01-05", "2026-01-06"


def served(sid: str, user: str, items: list[str], arm: str = "a", day: str = DAY,
           ts: float = 1.0, holdout: bool = False, experiment: str = "e") -> dict[str, Any]:
    return {"stream_id": sid, "request_id": f"r{sid}", "ts": ts, "day": day,
            "experiment": experiment, "arm": arm, "model_version": "v1", "user_id": user,
            "holdout": holdout, "items": items, "features": "{}", "item_features": "{}",
            "client_ts": None}


def event(sid: str, user: str, kind: str, items: list[str] | None = None,
          item: str | None = None, arm: str = "a", day: str = DAY,
          holdout: bool = False) -> dict[str, Any]:
    return {"stream_id": sid, "event_id": f"ev{sid}", "type": kind, "request_id": "r1",
            "user_id": user, "ts": "2026-01-05T10:00:00Z", "item_id": item, "items": items,
            "positions": list(range(1, len(items) + 1)) if items else None,
            "experiment": "e", "arm": arm, "model_version": "v1", "day": day,
            "holdout": holdout, "request_ts": 1.0}


def write(logs: Path, kind: str, rows: list[dict[str, Any]], name: str = "e-a-0-1") -> None:
    """Rows as the drainer writes them: one file per day."""
    for day in {r["day"] for r in rows}:
        path = logs / f"day={day}" / f"{kind}-{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["day"] == day],
                                            schema=SCHEMAS[kind]), path)


def metrics(logs: Path, top: int = 10, catalogue: int | None = None) -> dict[str, Any]:
    return list_metrics(open_logs(logs), "e", top, catalogue)


def test_identical_lists_are_not_personal_and_disjoint_ones_fully(tmp_path):
    write(tmp_path, "serve", [
        served("1-0", "u1", ["i1", "i2", "i3"]), served("2-0", "u2", ["i1", "i2", "i3"]),
        served("3-0", "u3", ["i1", "i2", "i3"], arm="b"),
        served("4-0", "u4", ["i4", "i5", "i6"], arm="b")])
    got = metrics(tmp_path, top=3)["days"][DAY]
    assert (got["a"]["personalization"], got["b"]["personalization"]) == (0.0, 1.0)
    assert (got["a"]["coverage"], got["b"]["coverage"]) == (0.5, 1.0)  # of 6 items served
    assert got["a"]["users"] == got["b"]["users"] == 2
    assert got["a"]["popularity"] is None  # no downloads in the period


def test_three_users_mean_overlap_over_every_pair(tmp_path):
    # L = 2: pairs (1,2) share 1 of 2, (1,3) and (2,3) nothing: mean overlap 1/6
    write(tmp_path, "serve", [served("1-0", "u1", ["a", "b", "z"]),
                              served("2-0", "u2", ["a", "c", "z"]),
                              served("3-0", "u3", ["d", "e"])])
    got = metrics(tmp_path, top=2)["days"][DAY]["a"]
    assert got["personalization"] == pytest.approx(5 / 6)
    assert got["top"] == 2 and got["distinct_items"] == 5
    # the catalogue counts every served item, beyond the top L too
    assert got["coverage"] == pytest.approx(5 / 6)
    assert metrics(tmp_path, top=2, catalogue=10)["days"][DAY]["a"]["coverage"] == 0.5


def test_a_users_list_is_their_last_one_and_holdout_is_left_out(tmp_path):
    write(tmp_path, "serve", [
        served("5-0", "u1", ["a", "b"], ts=20.0), served("1-0", "u1", ["x", "y"], ts=10.0),
        served("2-0", "u2", ["a", "b"], ts=15.0),
        served("3-0", "u9", ["q", "r"], holdout=True, ts=30.0),
        served("6-0", "u1", ["m", "n"], day=DAY2, ts=90_000.0)])
    got = metrics(tmp_path)
    day = got["days"][DAY]["a"]
    assert (day["users"], day["personalization"], day["top"]) == (2, 0.0, 2)  # L capped at 2
    assert day["distinct_items"] == 2
    assert got["days"][DAY2]["a"]["users"] == 1
    assert got["days"][DAY2]["a"]["personalization"] is None  # no pair of users
    total = got["total"]["a"]  # over the period: u1's last list is of the second day
    assert (total["users"], total["personalization"]) == (2, 1.0)
    assert got["catalogue"]["size"] == 8  # holdout's items and u1's first list included


def test_popularity_is_the_mean_download_share_of_the_top_items(tmp_path):
    write(tmp_path, "serve", [served("1-0", "u1", ["i1", "i2", "i3"]),
                              served("2-0", "u2", ["i4", "i1", "i5"], arm="b")])
    downloads = [event(f"{n}-0", "u1", "download", item="i1") for n in range(3)]
    downloads += [event("9-0", "u2", "download", item="i4", arm="b"),
                  event("7-0", "u8", "download", item="i2", holdout=True)]  # not counted
    write(tmp_path, "events", downloads)
    write(tmp_path, "events", downloads[:1], name="e-a-again")  # drained twice: one entry
    got = metrics(tmp_path, top=2)
    assert got["downloads"] == 4
    # shares: i1 3/4, i4 1/4; a's top 2 (i1, i2): 3/8; b's (i4, i1): 1/2
    assert got["days"][DAY]["a"]["popularity"] == pytest.approx(3 / 8)
    assert got["days"][DAY]["b"]["popularity"] == pytest.approx(1 / 2)


def test_a_catalogue_smaller_than_the_lists_is_refused(tmp_path):
    write(tmp_path, "serve", [served("1-0", "u1", ["a", "b", "c"])])
    with pytest.raises(ValueError, match="smaller than the 3 distinct items"):
        metrics(tmp_path, catalogue=2)


def brute_force(lists: dict[str, list[str]], top: int, share: dict[str, float],
                catalogue: int) -> dict[str, Any]:
    tops = {u: set(items[:top]) for u, items in lists.items()}
    length = max(len(t) for t in tops.values())
    pairs = [len(tops[u] & tops[v]) / length for u, v in itertools.permutations(tops, 2)]
    slots = [share.get(i, 0.0) for t in tops.values() for i in t]
    return {"personalization": 1 - sum(pairs) / len(pairs) if pairs else None,
            "coverage": len(set().union(*tops.values())) / catalogue,
            "popularity": sum(slots) / len(slots)}


def test_sql_equals_a_brute_force_over_every_pair(tmp_path):
    rng = random.Random(3)
    items = [f"i{n}" for n in range(40)]
    rows, last = [], {}
    for n in range(400):
        arm, day, user = rng.choice("ab"), rng.choice([DAY, DAY2]), f"u{rng.randrange(60)}"
        ts = float(n) + (0 if day == DAY else 86_400)
        served_items = rng.sample(items[: rng.choice([15, 40])], rng.randint(3, 12))
        rows.append(served(f"{n}-0", user, served_items, arm=arm, day=day, ts=ts))
        last[(arm, day, user)] = served_items  # rows come in ts order within a day
    write(tmp_path, "serve", rows)
    weights = {i: rng.randint(0, 5) for i in items[:25]}
    downloads = [event(f"{i}-{k}", "u1", "download", item=i)
                 for i, w in weights.items() for k in range(w)]
    write(tmp_path, "events", downloads)
    share = {i: w / len(downloads) for i, w in weights.items()}
    catalogue = len({i for r in rows for i in r["items"]})
    got = metrics(tmp_path, top=8)
    for (arm, day) in itertools.product("ab", [DAY, DAY2]):
        lists = {u: v for (a, d, u), v in last.items() if (a, d) == (arm, day)}
        want = brute_force(lists, 8, share, catalogue)
        for key, value in want.items():
            assert got["days"][day][arm][key] == pytest.approx(value), (arm, day, key)


def test_user_level_sums_follow_the_counting_rules(tmp_path):
    rows = [event("1-0", "u1", "impression", items=["a", "b", "c"]),
            event("2-0", "u1", "download", item="a"),
            event("3-0", "u1", "download", item="b"),
            event("4-0", "u2", "impression", items=["a"]),
            event("5-0", "u3", "download", item="a"),  # a download alone makes a user
            event("6-0", "u9", "impression", items=["a", "b"], holdout=True),
            event("7-0", "u1", "impression", items=["d", "e"], day=DAY2),
            event("1-0", "u4", "impression", items=["z"], arm="b")]
    write(tmp_path, "events", rows)
    write(tmp_path, "events", rows[:2], name="e-a-rewritten")  # the at-least-once drain
    sums = arm_sums(open_logs(tmp_path), "e")
    assert sums[DAY]["a"] == ArmStats.from_user_arrays([3, 1, 0], [2, 0, 1])
    assert sums[DAY2]["a"] == ArmStats.from_user_arrays([2], [0])
    assert sums["all"]["a"] == ArmStats.from_user_arrays([5, 1, 0], [2, 0, 1])
    assert sums[DAY]["b"] == ArmStats.from_user_arrays([1], [0])


def test_list_metrics_command_prints_a_table_and_json(tmp_path, capsys):
    write(tmp_path, "serve", [served("1-0", "u1", ["i1", "i2"]),
                              served("2-0", "u2", ["i1", "i3"], arm="b")])
    assert main(["list-metrics", "--logs", str(tmp_path), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "personalization@L" in text and "L = 2" in text
    assert [line.split()[:2] for line in text.splitlines()[3:]] == [
        [DAY, "a"], [DAY, "b"], ["total", "a"], ["total", "b"]]
    assert main(["list-metrics", "--logs", str(tmp_path), "--experiment", "e", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["days"][DAY]["b"]["coverage"] == pytest.approx(2 / 3)


def test_list_metrics_command_names_the_problem(tmp_path, capsys):
    assert main(["list-metrics", "--logs", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    write(tmp_path, "serve", [served("1-0", "u1", ["i1"]),
                              served("2-0", "u2", ["i1"], experiment="f")])
    assert main(["list-metrics", "--logs", str(tmp_path)]) == 2
    assert "holds e, f" in capsys.readouterr().err
    assert main(["list-metrics", "--logs", str(tmp_path), "--experiment", "g"]) == 2
    assert "no rows of experiment 'g'" in capsys.readouterr().err
    assert main(["list-metrics", "--logs", str(tmp_path), "--experiment", "e",
                 "--catalogue-size", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


# ---- the drainer's recompute, from log entries in Redis --------------------------------------
REPO = Path(__file__).resolve().parents[1]
NO_DUCKDB = "DuckDB is not installed (pip install 'ctrserve[analysis]')"


@pytest.fixture
def store(own_redis_url):
    client = redis.Redis.from_url(own_redis_url)
    yield client
    client.close()


def log_entry(client: redis.Redis, experiment: str, arm: str, user: str, items: list[str],
              day: str = DAY, downloads: tuple[str, ...] = ()) -> None:
    """A scored request and its downloads, as the scorer and the event script log them."""
    rid = f"{experiment}-{user}-{day}-{len(items)}-{items[0]}"
    record = {"request_id": rid, "ts": time.time(), "day": day, "client_ts": None,
              "experiment": experiment, "arm": arm, "model_version": "v1", "user": user,
              "holdout": False, "items": items, "features": {}, "item_features": {}}
    claims = {"request_id": rid, "experiment": experiment, "arm": arm, "model_version": "v1",
              "user": user, "day": day, "ts": record["ts"], "holdout": False}
    streams = {kind: log_key(experiment, arm, kind) for kind in ("serve", "events")}
    client.sadd(LOGS_KEY, *streams.values())
    client.xadd(streams["serve"], {"r": json.dumps(record)})
    for item in downloads:
        event = {"event_id": f"{rid}-{item}", "type": "download", "request_id": rid,
                 "user_id": user, "ts": f"{day}T10:00:00Z", "item_id": item}
        client.xadd(streams["events"], {"event": json.dumps(event),
                                        "claims": json.dumps(claims)})


def config_file(tmp_path: Path, experiment: str) -> Path:
    arms = [{"name": "a", "weight": 0.5, "bundle": "lr-x", "control": True},
            {"name": "b", "weight": 0.5, "bundle": "deepfm-x"}]
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"experiments": [
        {"name": experiment, "salt": experiment, "arms": arms}]}))
    return path


def cli_json(capsys, *argv: str) -> Any:
    """A command's JSON on stdout (`drain-events` prints nothing else; the others need --json)."""
    assert main([*argv, *(["--json"] if argv[0] != "drain-events" else [])]) == 0
    return json.loads(capsys.readouterr().out)


def stored(capsys, experiment: str, experiments: Path) -> dict[str, Any] | None:
    """The report's list metrics (`ctrserve report --json`)."""
    return cli_json(capsys, "report", "--experiment", experiment, "--experiments",
                    str(experiments))["list_metrics"]


def computed(capsys, logs: Path, experiment: str) -> dict[str, Any]:
    """`ctrserve list-metrics --json` on the logs."""
    return cli_json(capsys, "list-metrics", "--logs", str(logs), "--experiment", experiment)


def without_when(lists: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in lists.items() if k != "computed"}


def test_every_drain_recomputes_the_list_metrics_over_every_drained_day(
        store, own_redis_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", own_redis_url)
    experiments, logs = config_file(tmp_path, "lm1"), tmp_path / "logs"
    assert stored(capsys, "lm1", experiments) is None
    assert main(["report", "--experiment", "lm1", "--experiments", str(experiments)]) == 0
    assert "List metrics: none yet; list metrics appear after the logs are drained" in (
        capsys.readouterr().out)
    log_entry(store, "lm1", "a", "u1", ["i1", "i2", "i3"], downloads=("i1",))
    log_entry(store, "lm1", "a", "u2", ["i1", "i4", "i5"])
    log_entry(store, "lm1", "b", "u3", ["i2", "i6", "i7"], downloads=("i2", "i6"))
    drained = cli_json(capsys, "drain-events", "--out", str(logs))
    assert drained["experiments"] == drained["list_metrics"]["experiments"] == ["lm1"]
    first = stored(capsys, "lm1", experiments)
    assert without_when(first) == computed(capsys, logs, "lm1")
    assert first["computed"]["logs"] == str(logs) and list(first["days"]) == [DAY]
    assert first["total"]["a"]["personalization"] == pytest.approx(1 - 1 / 3)
    assert first["total"]["b"]["popularity"] == pytest.approx((1 + 1 + 0) / 3 / 3)
    # a second day: the total is over both (u1's last list is the second day's)
    log_entry(store, "lm1", "a", "u1", ["i4", "i5", "i6"], day=DAY2)
    assert cli_json(capsys, "drain-events", "--out", str(logs))["list_metrics"][
        "experiments"] == ["lm1"]
    second = stored(capsys, "lm1", experiments)
    assert without_when(second) == computed(capsys, logs, "lm1")
    assert list(second["days"]) == [DAY, DAY2] and second["total"]["a"]["users"] == 2
    assert second["total"]["a"]["personalization"] == pytest.approx(1 - 2 / 3)
    # nothing drained: nothing recomputed; the metrics expire like the counts' `all` sums
    assert "list_metrics" not in cli_json(capsys, "drain-events", "--out", str(logs))
    assert 89 * 86_400 < store.ttl(lists_key("lm1")) <= 91 * 86_400
    assert main(["report", "--experiment", "lm1", "--experiments", str(experiments)]) == 0
    text = capsys.readouterr().out
    assert "lm1 list metrics: the first L = 10" in text and f"from the logs in {logs}" in text
    # the experiment is not listed twice among those Redis holds (its metrics' key aside)
    assert main(["report", "--experiment", "nope"]) == 2
    assert "'lm1:lists'" not in capsys.readouterr().err


def test_logs_duckdb_cannot_read_keep_the_stored_metrics_and_the_drain_goes_on(
        store, own_redis_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", own_redis_url)
    experiments, logs = config_file(tmp_path, "lm4"), tmp_path / "logs"
    log_entry(store, "lm4", "a", "u1", ["i1", "i2"])
    assert drain(store, logs)["list_metrics"]["experiments"] == ["lm4"]
    before = stored(capsys, "lm4", experiments)
    (logs / f"day={DAY}" / "serve-cut-short.parquet").write_bytes(b"PAR1 not parquet")
    log_entry(store, "lm4", "a", "u2", ["i3", "i4"])
    result = drain(store, logs)
    assert result["served"] == 1 and result["list_metrics"]["experiments"] == []
    assert "serve-cut-short.parquet" in result["list_metrics"]["failed"]["lm4"]
    assert stored(capsys, "lm4", experiments) == before  # not half-replaced, not deleted
    assert [Path(f).name.startswith("serve-lm4-a-") for f in result["files"]] == [True]


def fake_duckdb(tmp_path: Path) -> str:
    """A PYTHONPATH on which `import duckdb` fails as where it is not installed."""
    package = tmp_path / "no-duckdb" / "duckdb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'duckdb'\", name='duckdb')\n")
    return os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")])


def test_without_duckdb_the_drain_succeeds_and_says_once_why_there_are_no_list_metrics(
        store, own_redis_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", own_redis_url)
    experiments, logs = config_file(tmp_path, "lm2"), tmp_path / "logs"
    log_entry(store, "lm2", "a", "u1", ["i1", "i2"], downloads=("i1",))
    log_entry(store, "lm2", "b", "u2", ["i2", "i3"])
    env = {**os.environ, "REDIS_URL": own_redis_url, "PYTHONPATH": fake_duckdb(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "ctrserve", "drain-events", "--out",
                           str(logs)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["served"], result["events"], result["left"]) == (
        2, 1, {"events": 0, "serve": 0})
    assert result["list_metrics"] == {"experiments": [], "not_computed": NO_DUCKDB}
    assert proc.stderr.splitlines() == [
        f"list metrics not computed for lm2: {NO_DUCKDB}; the logs are drained all the same "
        "(ctrserve list-metrics computes them where DuckDB is)"]
    assert len(read_serve_log(logs)) == 2
    assert stored(capsys, "lm2", experiments) is None
    # where DuckDB is, the same logs give them
    assert computed(capsys, logs, "lm2")["total"]["a"]["users"] == 1


def wait_for(condition: Callable[[], Any], proc: subprocess.Popen, timeout_s: float = 60) -> Any:
    """The condition's value once it holds, while the drainer runs."""
    def check() -> Any:
        assert proc.poll() is None, proc.stderr.read()
        return condition()

    return wait_until(check, "the drainer's recompute", timeout_s)


def test_follow_recomputes_at_most_every_minute_and_once_more_at_the_end(
        store, own_redis_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", own_redis_url)
    experiments, logs = config_file(tmp_path, "lm3"), tmp_path / "logs"
    log_entry(store, "lm3", "a", "u1", ["i1", "i2"])
    log_entry(store, "lm3", "a", "u2", ["i1", "i3"])
    cmd = [sys.executable, "-m", "ctrserve", "drain-events", "--follow", "--out", str(logs),
           "--interval", "0.1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "REDIS_URL": own_redis_url}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for(lambda: stored(capsys, "lm3", experiments), proc)
        assert first["total"]["a"]["users"] == 2  # the first pass recomputes at once
        log_entry(store, "lm3", "a", "u3", ["i4", "i5"])
        wait_for(lambda: len(read_serve_log(logs)) == 3, proc)
        assert stored(capsys, "lm3", experiments) == first  # not due for a minute
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["list_metrics_recomputed"] == 2
    assert stderr.count("list metrics of lm3 recomputed in") == 2
    last = stored(capsys, "lm3", experiments)
    assert last["total"]["a"]["users"] == 3  # at the end, over everything drained
    assert without_when(last) == computed(capsys, logs, "lm3")
