"""The A/B dashboard (GET /dashboard/{experiment}) over real HTTP, and in a headless browser."""

from __future__ import annotations

import re
import shutil
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import yaml

from service.dashboard.svg import Marker, Point, Series, line_chart, nice_ticks
from service.deployments import deploy
from service.feature_store import load_tables
from service.redis_server import embedded_url, start_embedded, stop_embedded
from service.settings import Settings
from tests.serving import LiveServer, copy_registry
from tests.test_events import ITEMS, download, impression, score, send

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
WHY = "<b>canary</b> & see"


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
    points = [a for a in tags.having("data-series") if "data-value" in a]
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
    assert 'data-label="canary deepfm"' in html
    assert 'data-flagged="false"' in html


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
    assert len(root.findall(f".//{ns}polyline")) == 1  # d3-d4; d1 stands alone
    assert len(root.findall(f".//{ns}polygon")) == 1
    assert len(root.findall(f".//{ns}g")) == 1  # the marker outside the axis is left out
    assert "a&lt;&amp;&gt;" in svg and "&lt;why&gt;" in svg
    assert nice_ticks(0.063) == [0.0, 0.02, 0.04, 0.06, 0.08]
    assert nice_ticks(0.0) == [0.0, 0.5, 1.0]


def test_dashboard_in_a_headless_browser(world, tmp_path):
    """Chromium (Debian's) renders the page without a console error, with the report's
    figures; the screenshot goes to test-artifacts/dashboard.png."""
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    url, rep = world["url"], _report(world["url"])
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            response = page.goto(url + "/dashboard/ab", wait_until="load")
            assert response is not None and response.status == 200
            shown = page.eval_on_selector_all("#totals tr[data-arm]", """rows => rows.map(r => ({
                arm: r.dataset.arm, users: +r.dataset.users, impressions: +r.dataset.impressions,
                downloads: +r.dataset.downloads,
                text: r.querySelector('td.impressions').innerText}))""")
            charts = page.eval_on_selector_all("svg.chart", """svgs => svgs.map(s => {
                const box = s.getBoundingClientRect();
                return {w: box.width, h: box.height, points: s.querySelectorAll('circle').length};
            })""")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(shot, artifacts / "dashboard.png")
    assert errors == []
    expected = [{"arm": a, "users": e["users"], "impressions": e["impressions"],
                 "downloads": e["downloads"], "text": f"{e['impressions']:,}"}
                for a, e in rep["total"]["arms"].items()]
    assert shown == expected
    assert len(charts) == 2 and all(c["w"] > 300 and c["h"] > 100 for c in charts)
    assert all(c["points"] == 2 * len(rep["days"]) for c in charts)
    assert shot.stat().st_size > 10_000
