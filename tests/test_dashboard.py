"""The A/B dashboard (GET /dashboard/{experiment}) over real HTTP, and in a headless browser."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from ctrserve.cli import main
from ctrserve.common.keys import TOTAL, arm_key, days_key
from ctrserve.service.counts import SUMS
from ctrserve.service.dashboard.page import CVR_LABEL, MIN_DAY_USERS, MIN_SRM_USERS, WHY_CHARS
from ctrserve.service.dashboard.svg import (
    Marker,
    Point,
    Series,
    Shade,
    line_chart,
    nice_ticks,
    y_top,
)
from ctrserve.service.dashboard.timeline import DayAxis, place, serving_days
from ctrserve.service.deployments import deploy
from ctrserve.service.experiments.stats import ArmStats
from ctrserve.service.feature_store import load_tables
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry
from tests.test_events import ITEMS, download, impression, score, send

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
WHY = "<b>canary</b> & see"
WEEK = [f"2025-03-0{d}" for d in range(3, 8)]  # five simulated days on the clients' clock
TINY_DAY = "2025-03-20"  # after a 12-day gap: one user, 1 download of 2 impressions (CTR 50%)
TRUE_CTR = {"lr": 0.11, "deepfm": 0.15, "fm": 0.11}
RETRAIN_WHY = "retrain week--deepfm--2025-03-04: AUC 0.7712 vs 0.7650"
LONG_WHY = ("hand rollback of the fm arm after the on-call saw the calibration drift on the "
            "serving dashboard; see the incident notes for the whole story, " * 3)


class Tags(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def having(self, attr: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.tags if attr in a]


@pytest.fixture(scope="module")
def world(bundles, synth_dir, tmp_path_factory):
    """A scorer with experiments `ab` (traffic, events, a canary) and `quiet` (nothing)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    registry = copy_registry(bundles, tmp / "registry", models=("lr", "deepfm", "fm"))
    store = start_embedded(tmp / "store.rdb")
    load_tables(store, synth_dir / "users.parquet", synth_dir / "apps.parquet")
    arms = [{"name": "lr", "weight": 0.5, "bundle": bundles["lr"].name, "control": True},
            {"name": "deepfm", "weight": 0.5, "bundle": bundles["deepfm"].name}]
    config = {"experiments": [{"name": "ab", "salt": "ab-1", "arms": arms},
                              {"name": "quiet", "salt": "quiet-1", "arms": arms}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(store), deploy_poll_s=0.2, max_candidates=50,
                        queue_capacity_rows=1024, warmup_rounds=1)
    try:
        with LiveServer(settings) as live:
            _traffic(live.url)
            deploy(store, "ab", "deepfm", bundles["fm"].name, "tester", WHY, registry=registry,
                   canary=0.25)
            _wait_for_canary(live.url)
            yield {"url": live.url, "registry": registry, "store": store, "lr": bundles["lr"]}
    finally:
        stop_embedded(store)


def _traffic(url: str) -> None:
    """60 requests of 40 users on `ab`: impressions of what was served, some downloads."""
    for n in range(60):
        user = f"u{n % 40:05d}"
        reply = score(url, user, ITEMS[:6], experiment="ab", top_k=4)
        shown = reply["item_ids"][: 1 + n % 4]
        events = [impression(f"i-{n}", reply, user, shown)]
        events += [download(f"d-{n}-{i}", reply, user, item)
                   for i, item in enumerate(shown) if (n + i) % 3 == 0]
        assert send(url, events)["rejected"] == 0


def _wait_for_canary(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        experiments = httpx.get(url + "/v1/experiments").json()["experiments"]
        arms = {a["name"]: a for e in experiments if e["name"] == "ab" for a in e["arms"]}
        if arms["deepfm"]["canary"]:
            return
        time.sleep(0.1)
    raise AssertionError("the scorer did not pick up the canary")


def _report(url: str) -> dict:
    return httpx.get(url + "/v1/experiments/ab/report").json()


def test_dashboard_shows_the_reports_figures_models_and_history(world):
    url = world["url"]
    page = httpx.get(url + "/dashboard/ab")
    rep = _report(url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html, tags = page.text, Tags(page.text)
    assert html.count("<svg") == 2 and [a["data-chart"] for a in tags.having("data-chart")] == [
        "ctr", "cvr"]
    for svg in re.findall(r"<svg.*?</svg>", html, re.S):
        ET.fromstring(svg)  # well-formed
    # totals: the JSON report's figures, as attributes and as the text shown
    totals = {a["data-arm"]: a for a in tags.having("data-impressions")}
    assert list(totals) == ["lr", "deepfm"]
    for arm, entry in rep["total"]["arms"].items():
        assert entry["impressions"] > 0
        for key in ("users", "impressions", "downloads"):
            assert int(totals[arm][f"data-{key}"]) == entry[key]
            row = re.search(rf'<tr data-arm="{arm}" data-users=.*?</tr>', html).group(0)
            assert f'<td class="{key}">{entry[key]:,}</td>' in row
        assert float(totals[arm]["data-ctr"]) == entry["ctr"]["value"]
    # the charts: one point per arm and day, at the day's value
    points = [a for a in tags.having("data-value")]
    day, day_rep = next(iter(rep["days"].items()))
    for arm in ("lr", "deepfm"):
        ctr = [p for p in points if p["data-series"] == arm and p["data-x"] == day]
        assert float(ctr[0]["data-value"]) == day_rep["arms"][arm]["ctr"]["value"]
        assert float(ctr[1]["data-value"]) == day_rep["arms"][arm]["cvr"]["value"]
    # serving now: the versions /v1/experiments gives, and the canary
    described = next(e for e in httpx.get(url + "/v1/experiments").json()["experiments"]
                     if e["name"] == "ab")
    serving = {a["data-arm"]: a for a in tags.having("data-model-version")}
    for arm in described["arms"]:
        assert serving[arm["name"]]["data-model-version"] == arm["model_version"]
    assert serving["deepfm"]["data-canary"] == described["arms"][1]["canary"]["bundle"]
    # the history, escaped, and its marker on the time axis
    assert [a["data-kind"] for a in tags.having("data-kind")] == ["canary"]
    assert "&lt;b&gt;canary&lt;/b&gt; &amp; see" in html and "<b>canary" not in html
    assert 'data-label="canary deepfm"' in html  # clock=server: at its wall-clock time
    # 40 users: too few for the sample-ratio check, every point hollow and joined by no line
    assert 'id="srm-note"' in html and 'id="srm"' not in html
    assert all("small" in (a.get("class") or "") for a in points) and "<polyline" not in html


def test_list_metrics_show_per_arm_and_day_once_the_logs_are_drained(world, tmp_path,
                                                                      monkeypatch, capsys):
    """`ctrserve drain-events` computes the list metrics; the page then shows, per arm over all
    days and per day, what `ctrserve list-metrics` computes on the drained logs. An experiment
    whose logs were never drained says when they appear."""
    url = world["url"]
    absent = "list metrics appear after the logs are drained (ctrserve drain-events)"
    assert absent in httpx.get(url + "/dashboard/quiet").text
    monkeypatch.setenv("REDIS_URL", embedded_url(world["store"]))
    logs = tmp_path / "logs"
    assert main(["drain-events", "--out", str(logs)]) == 0
    assert "ab" in json.loads(capsys.readouterr().out)["list_metrics"]["experiments"]
    assert main(["list-metrics", "--logs", str(logs), "--experiment", "ab", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    expected = {("all", arm): m for arm, m in want["total"].items()}
    expected |= {(day, arm): m for day, by_arm in want["days"].items()
                 for arm, m in by_arm.items()}
    html = httpx.get(url + "/dashboard/ab").text
    rows = {(a["data-period"], a["data-arm"]): a for a in Tags(html).having("data-period")}
    assert set(want["total"]) == {"lr", "deepfm"} and rows.keys() == expected.keys()
    for key, m in expected.items():
        row = rows[key]
        assert (int(row["data-list-users"]), int(row["data-top"])) == (m["users"], m["top"])
        for metric in ("personalization", "coverage", "popularity"):
            shown = row[f"data-{metric}"]
            assert (float(shown) if shown else None) == m[metric], (key, metric)
    lr = want["total"]["lr"]
    assert (f"<td>{lr['personalization']:.3f}</td><td>{lr['coverage']:.1%}</td>"
            f"<td>{lr['popularity']:.3%}</td>") in html
    for name in ("personalization@L", "coverage@L", "popularity@L"):
        assert f"<strong>{name}</strong>: " in html  # named, with its one-line definition
    assert absent not in html and html.index('id="days"') < html.index('id="lists"')
    assert absent in httpx.get(url + "/dashboard/quiet").text  # nothing of it was drained


def test_index_empty_and_unknown_experiments(world, bundles):
    url = world["url"]
    index = httpx.get(url + "/dashboard")
    assert index.status_code == 200
    assert 'href="/dashboard/ab"' in index.text and 'href="/dashboard/quiet"' in index.text
    quiet = httpx.get(url + "/dashboard/quiet")
    assert quiet.status_code == 200 and 'id="no-data"' in quiet.text and "<svg" not in quiet.text
    assert 'data-model-version="' in quiet.text  # what the arms serve, even without data
    missing = httpx.get(url + "/dashboard/no-such-exp")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "no-such-exp" in missing.text and 'href="/dashboard/ab"' in missing.text
    # one experiment: /dashboard goes straight to it
    single = Settings(registry=world["registry"], bundle=bundles["lr"].name,
                      redis_url=embedded_url(world["store"]), warmup_rounds=1)
    with LiveServer(single) as live:
        reply = httpx.get(live.url + "/dashboard")
        assert reply.status_code == 307 and reply.headers["location"] == "/dashboard/default"


def test_chart_handles_gaps_single_points_and_escapes():
    series = [Series("a<&>", [Point(0.5, 0.1, 0.05, 0.15, "d1"), Point(1.5, None, key="d2"),
                              Point(2.5, 0.2, 0.1, 0.3, "d3"), Point(3.5, 0.25, 0.2, 0.3, "d4")])]
    svg = line_chart("t <x>", series, (0, 4), [(0.5, "d1")], str,
                     [Marker(1.0, "deploy", "<why>"), Marker(9.0, "outside")])
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f".//{ns}circle")) == 3
    lines = root.findall(f".//{ns}polyline")
    assert [p.get("data-keys") for p in lines] == ["d3 d4"]  # d1 stands alone
    assert len(root.findall(f".//{ns}polygon")) == 1
    assert len(root.findall(f".//{ns}g")) == 1  # the marker outside the axis is left out
    assert "a&lt;&amp;&gt;" in svg and "&lt;why&gt;" in svg
    assert nice_ticks(0.063) == [0.0, 0.02, 0.04, 0.06, 0.08]
    assert nice_ticks(0.0) == [0.0, 0.5, 1.0]


def test_small_points_are_hollow_break_the_line_and_leave_the_scale_alone():
    points = [Point(0.5, 0.10, 0.09, 0.11, "d1"), Point(1.5, 0.12, 0.11, 0.13, "d2"),
              Point(2.5, 0.50, key="d3", small=True), Point(3.5, 0.11, 0.10, 0.12, "d4"),
              Point(4.5, 0.13, 0.12, 0.14, "d5")]
    series = [Series("a", points)]
    assert y_top(series) == pytest.approx(0.14 * 1.05)
    assert y_top([Series("b", [Point(0.5, 0.5, key="x", small=True)])]) == pytest.approx(0.525)
    svg = line_chart("t", series, (0, 5), [], str, shades=[Shade(1.9, 2.1, "no data\n3 d")])
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert float(root.get("data-y-max")) < 0.5
    assert [p.get("data-keys") for p in root.findall(f".//{ns}polyline")] == ["d1 d2", "d4 d5"]
    assert len(root.findall(f".//{ns}polygon")) == 2  # no band through the small day
    (tiny,) = [e for e in root.iter() if e.get("data-x") == "d3"]
    assert tiny.tag == f"{ns}path" and tiny.get("data-offscale") == "true"
    assert tiny.get("fill") == "#fff" and "small" in tiny.get("class")
    assert len(root.findall(f".//{ns}line[@class='errorbar']")) == 4
    assert root.find(f".//{ns}g[@class='gap']") is not None


def test_day_axis_squeezes_gaps_and_places_deployments():
    axis = DayAxis.of(["2025-03-03", "2025-03-04", "2025-03-20"])
    assert axis.starts == {"2025-03-03": 0.0, "2025-03-04": 1.0, "2025-03-20": 2.6}
    (gap,) = axis.gaps
    assert (gap.first, gap.last, gap.days) == ("2025-03-05", "2025-03-19", 15)
    assert axis.end == pytest.approx(3.6) and axis.x("2025-03-10") == pytest.approx(2.3)
    assert axis.x("2025-02-01") is None and axis.x("2025-04-01") is None
    assert [label for _, label in axis.ticks()] == ["2025-03-03", "2025-03-04", "2025-03-20"]
    record = {"when": "2025-03-04T18:00:00+00:00", "version": 7, "kind": "deploy"}
    # clock=server: the counts' days are the wall clock's, so `when` itself
    assert place(record, axis, "server", {}).x == pytest.approx(1.75)
    # clock=client: the wall clock says nothing about the clients' days
    off = place(record, axis, "client", {})
    assert off.x is None and "not drawn" in off.text
    # ... unless its retrain record says which logged days it was trained on
    retrains = [{"experiment": "week", "key": "week--deepfm--2025-03-03",
                 "decision": "deployed", "deployment": {"version": 7}},
                {"experiment": "week", "key": "week--fm--2025-03-03", "decision": "rejected"},
                {"experiment": "other", "key": "other--a--2025-03-09",
                 "deployment": {"version": 8}},
                {"experiment": "week", "key": "week--fm--garbled", "deployment": {"version": 9}}]
    assert serving_days(retrains, "week") == {7: "2025-03-04"}
    assert place(record, axis, "client", {7: "2025-03-04"}).x == 1.0
    assert place(record, axis, "client", {7: "2025-03-12"}).x == pytest.approx(2.3)
    assert place(record, axis, "client", {7: "2026-12-01"}).x is None


@contextlib.contextmanager
def _browser_page(errors: list[str]) -> Iterator[Any]:
    """A page of Debian's Chromium, headless, that records console errors, page errors and
    failed requests in `errors`; skips where the browser or playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            yield page
        finally:
            browser.close()


def _open(page: Any, url: str) -> None:
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200


def _screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot, copied to test-artifacts/<name>."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)
    assert shot.stat().st_size > 10_000
    return shot


def test_dashboard_in_a_headless_browser(world, tmp_path):
    """Chromium (Debian's) renders the page without a console error, with the report's
    figures; the screenshot goes to test-artifacts/dashboard.png."""
    url, rep = world["url"], _report(world["url"])
    errors: list[str] = []
    with _browser_page(errors) as page:
        _open(page, url + "/dashboard/ab")
        shown = page.eval_on_selector_all("#totals tr[data-arm]", """rows => rows.map(r => ({
            arm: r.dataset.arm, users: +r.dataset.users, impressions: +r.dataset.impressions,
            downloads: +r.dataset.downloads,
            text: r.querySelector('td.impressions').innerText}))""")
        charts = page.eval_on_selector_all("svg.chart", """svgs => svgs.map(s => {
            const box = s.getBoundingClientRect();
            return {w: box.width, h: box.height, points: s.querySelectorAll('.point').length};
        })""")
        _screenshot(page, tmp_path, "dashboard.png")
    assert errors == []
    expected = [{"arm": a, "users": e["users"], "impressions": e["impressions"],
                 "downloads": e["downloads"], "text": f"{e['impressions']:,}"}
                for a, e in rep["total"]["arms"].items()]
    assert shown == expected
    assert len(charts) == 2 and all(c["w"] > 300 and c["h"] > 100 for c in charts)
    assert all(c["points"] == 2 * len(rep["days"]) for c in charts)


# ---- a simulated week on the clients' clock ------------------------------------------------
def _users(rng: np.random.Generator, n: int, ctr: float) -> ArmStats:
    """n users with geometric impressions and a per-user CTR from a Beta around `ctr`."""
    x = rng.geometric(0.2, n)
    return ArmStats.from_user_arrays(x, rng.binomial(x, rng.beta(ctr * 30, (1 - ctr) * 30, n)))


def _seed_counts(client: Any, experiment: str, days: dict[str, dict[str, ArmStats]]) -> None:
    """The sums hashes and day sets as the event script keeps them (ctrserve/common/keys.py), each
    user on one day only, so the experiment's totals are the days' sums."""
    arms = {arm for arms in days.values() for arm in arms}
    for arm in arms:
        parts = {day: arms[arm] for day, arms in days.items() if arm in arms}
        for day, stats in [*parts.items(), (TOTAL, ArmStats.total(parts.values()))]:
            sums = {k: getattr(stats, k) for k in SUMS}
            client.hset(arm_key(experiment, day, arm, "sums"), mapping=sums)
        client.sadd(days_key(experiment, arm), *parts)


@pytest.fixture(scope="module")
def week(world, bundles, tmp_path_factory):
    """A second scorer, with clock=client, on the same Redis and registry. Experiment `week`:
    LR control, DeepFM (true CTR +36%) and FM arms, five simulated days of 400 users per arm
    (counts written directly, the ingestion path is tested in test_events.py), nothing for
    twelve days, then one user in LR only; a retrain deployment of DeepFM trained on the days
    up to 03-04, and a hand deployment of FM. Experiment `one`: one user, in LR."""
    tmp = tmp_path_factory.mktemp("week")
    rng = np.random.default_rng(20250303)
    days = {d: {arm: _users(rng, 400, ctr) for arm, ctr in TRUE_CTR.items()} for d in WEEK}
    days[TINY_DAY] = {"lr": ArmStats.from_user_arrays([2], [1])}
    store, registry = world["store"], world["registry"]
    _seed_counts(store, "week", days)
    _seed_counts(store, "one", {WEEK[0]: {"lr": ArmStats.from_user_arrays([3], [1])}})
    arms = [{"name": m, "weight": round(1 / 3, 4), "bundle": bundles[m].name} for m in TRUE_CTR]
    arms[0]["control"], arms[-1]["weight"] = True, 0.3334
    config = {"experiments": [{"name": "week", "salt": "week-1", "arms": arms},
                              {"name": "one", "salt": "one-1", "arms": arms}]}
    (tmp / "experiments.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(registry=registry, experiments_file=tmp / "experiments.yaml",
                        redis_url=embedded_url(store), clock="client", deploy_poll_s=0.2,
                        warmup_rounds=1)
    with LiveServer(settings) as live:
        retrained = deploy(store, "week", "deepfm", bundles["fm"].name, "ctrserve retrain",
                           RETRAIN_WHY, registry=registry)
        key = "week--deepfm--2025-03-04"
        (registry / ".retrain").mkdir(exist_ok=True)
        (registry / ".retrain" / f"{key}.json").write_text(json.dumps(
            {"experiment": "week", "arm": "deepfm", "key": key, "decision": "deployed",
             "deployment": retrained}))
        deploy(store, "week", "fm", bundles["lr"].name, "alice", LONG_WHY, registry=registry)
        yield {"url": live.url, "report": httpx.get(live.url + "/v1/experiments/week/report"
                                                    ).json()}


def _full_days(rep: dict, key: str) -> list[float]:
    """The upper bounds of `key` on the days every arm has enough users for."""
    return [e[key]["hi"] for r in rep["days"].values() for e in r["arms"].values()
            if e["users"] >= MIN_DAY_USERS]


def _consecutive(days: list[str]) -> bool:
    dates = [date.fromisoformat(d) for d in days]
    return all(b - a == timedelta(days=1) for a, b in zip(dates, dates[1:], strict=False))


def test_week_on_the_clients_clock_over_http(week):
    """The page's HTML: verdicts, lines broken at the gap, the scale, SRM, markers, history."""
    rep, html = week["report"], httpx.get(week["url"] + "/dashboard/week").text
    tags = Tags(html)
    assert list(rep["days"]) == [*WEEK, TINY_DAY]
    verdicts = {a["data-arm"]: a for a in tags.having("data-ctr-decision")}
    for arm, entry in rep["total"]["arms"].items():
        if entry["decision"] is None:
            assert arm not in verdicts
            continue
        assert verdicts[arm]["data-ctr-decision"] == entry["decision"]["ctr"]
        assert verdicts[arm]["data-cvr-decision"] == entry["decision"]["cvr"]
    assert rep["total"]["arms"]["deepfm"]["decision"]["ctr"] == "treatment better"
    assert "2 treatments share the control lr: the intervals are per comparison" in html
    lines = [a["data-keys"].split() for a in tags.having("data-keys")]
    assert len(lines) == 2 * 3 and all(keys == WEEK for keys in lines)
    charts = {a["data-chart"]: float(a["data-y-max"]) for a in tags.having("data-y-max")}
    assert max(_full_days(rep, "ctr")) <= charts["ctr"] < 0.5
    assert 'id="srm"' in html and "too few users" in html  # the total's check; the tiny day's
    # the retrain deployment at the start of the day after its training data; the hand one
    # has no day on the clients' clock and no marker
    markers = [a for a in tags.having("data-label") if a.get("class") == "marker"]
    assert {(m["data-label"], float(m["data-x"])) for m in markers} == {("deploy deepfm", 2.0)}
    drawn = [a["data-drawn"] for a in tags.having("data-drawn")]
    assert drawn == ["false", "true"]  # newest first
    assert html.index('id="days"') < html.index('id="history"')
    # counts, and no drained logs: the list metrics' place says when they appear
    assert html.index('id="days"') < html.index('id="lists-absent"') < html.index('id="history"')
    assert f'title="{LONG_WHY}"' in html and f"{LONG_WHY[: WHY_CHARS - 1].rstrip()}…<" in html
    one = httpx.get(week["url"] + "/dashboard/one").text
    assert 'id="srm"' not in one and 'id="srm-note"' in one and "(expected" not in one
    assert f"shown from {MIN_SRM_USERS} users on (1 so far)" in one


def test_week_in_a_headless_browser(week, tmp_path):
    """What a product manager sees, rendered by Chromium: the verdict per arm as the report
    decides it, no line across the missing days, an axis the one-user day does not set, no
    sample-ratio check at n = 1, CVR named as downloads per user, a readable history; the
    screenshot goes to test-artifacts/dashboard-week.png."""
    rep = week["report"]
    errors: list[str] = []
    with _browser_page(errors) as page:
        _open(page, week["url"] + "/dashboard/week")
        verdicts = page.eval_on_selector_all("#verdict p.verdict", """ps => ps.map(p => ({
            arm: p.dataset.arm, text: p.innerText}))""")
        lines = page.eval_on_selector_all("svg.chart polyline", "ls => ls.map(l => l.dataset.keys)")
        y_max = page.eval_on_selector("svg[data-chart=ctr]", "s => +s.dataset.yMax")
        tiny = page.eval_on_selector_all(f"svg[data-chart=ctr] .point[data-x='{TINY_DAY}']",
                                         "ps => ps.map(p => p.dataset.offscale)")
        text = page.inner_text("body")
        why_widths = page.eval_on_selector_all(
            "#history .why", "ds => ds.map(d => d.getBoundingClientRect().width)")
        order = page.evaluate("""() => document.querySelector('#days').compareDocumentPosition(
            document.querySelector('#history')) & Node.DOCUMENT_POSITION_FOLLOWING""")
        _screenshot(page, tmp_path, "dashboard-week.png")
        _open(page, week["url"] + "/dashboard/one")
        one_srm = page.eval_on_selector_all("#srm", "es => es.length")
        one_text = page.inner_text("body")
    assert errors == []
    treatments = {a: e for a, e in rep["total"]["arms"].items() if e["decision"]}
    assert [v["arm"] for v in verdicts] == list(treatments)
    for v in verdicts:
        decision = treatments[v["arm"]]["decision"]
        assert v["text"].startswith(f"{v['arm']} vs lr: CTR ")
        assert re.search(rf"CTR [+−]\d+\.\d% \(always-valid 95% CI [+−]\d+\.\d% to "
                         rf"[+−]\d+\.\d%\): {decision['ctr']}; ", v["text"]), v["text"]
        assert v["text"].endswith(f": {decision['cvr']}")
    assert lines and all(_consecutive(keys.split()) and TINY_DAY not in keys for keys in lines)
    assert max(_full_days(rep, "ctr")) <= y_max < 0.5 and tiny == ["true"]
    assert CVR_LABEL in text and not re.search(r"CVR(?! \(downloads per user\))", text)
    assert "per comparison" in text
    assert why_widths and min(why_widths) > 200  # wraps by text, not one word per line
    assert order
    assert one_srm == 0 and "(expected" not in one_text and "Sample-ratio check: shown" in one_text
