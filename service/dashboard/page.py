"""The dashboard's HTML pages: one per experiment, the list of experiments, and the 404.

`experiment_page` takes the report of `service.counts.build_report` (`{"days": {day: report},
"total": report}`), the experiment as `GET /v1/experiments` describes it (arms, bundles, model
versions, canaries) and the experiment's deployment history records, and returns the page:
sample-ratio verdict, totals per arm with intervals and uplift, daily CTR and CVR charts with
their 95% bands and the deployments marked on the time axis, what each arm serves now, the
history, and the per-day figures. Plain functions of plain data: no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from service.dashboard.svg import PALETTE, Marker, Point, Series, line_chart

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#1b1b1b}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta,.note{color:#555;font-size:13px}a{color:#0b5cad}
table{border-collapse:collapse;margin:6px 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.name,th.name,td.text{text-align:left}
td,th{white-space:nowrap}td.text{white-space:normal}.ci{color:#555;font-size:12px}
.wide{overflow-x:auto}
.srm{padding:8px 12px;border-radius:4px;margin:12px 0}
.srm.ok{background:#eaf6ea}.srm.flagged{background:#fde2e1;border:2px solid #c62828;
font-weight:600}.srm.untestable{background:#f1f1f1}
.empty{padding:16px;background:#fff8e1;border:1px solid #e0c060;border-radius:4px}
.chart{max-width:100%;height:auto;display:block;margin:8px 0}
.chart .grid{stroke:#e4e4e4}.chart .axis{stroke:#888}
.chart .tick,.chart .legend,.chart .marker-label{font-size:11px;fill:#444}
.chart .chart-title{font-size:13px;font-weight:600;fill:#1b1b1b}
.sig{font-weight:600}
"""
DAY_SECONDS = 86400
DODGE = 0.04  # days between the points of two arms on one day


def experiment_page(rep: Mapping[str, Any], serving: Mapping[str, Any],
                    records: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The dashboard of one experiment."""
    name = rep["experiment"]
    body = [_header(rep, now or datetime.now(UTC))]
    if rep["days"]:
        body += [_srm(rep["total"]["srm"]), _totals(rep["total"]), _charts(rep, records)]
    else:
        body.append('<section class="empty" id="no-data"><strong>No data yet.</strong> No '
                    "scored request of this experiment has been counted. Figures appear once "
                    "clients score with it and send impressions and downloads to "
                    "<code>POST /v1/events</code>.</section>")
    body += [_serving(serving), _history(records)]
    if rep["days"]:
        body.append(_days(rep))
    return _document(f"{name}: A/B dashboard", "".join(body))


def index_page(names: list[str]) -> str:
    """The experiments, each a link to its page."""
    items = "".join(f'<li><a href="{_href(n)}">{escape(n)}</a></li>' for n in names)
    return _document("A/B dashboards", f"<h1>A/B dashboards</h1><ul>{items}</ul>")


def not_found_page(name: str, names: list[str]) -> str:
    """The 404 page: names the unknown experiment and lists the known ones."""
    items = "".join(f'<li><a href="{_href(n)}">{escape(n)}</a></li>' for n in names)
    return _document("unknown experiment",
                     f"<h1>Unknown experiment {escape(repr(name))}</h1>"
                     f"<p>The scorer serves these experiments:</p><ul>{items}</ul>")


def _document(title: str, body: str) -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def _href(name: str) -> str:
    return escape(f"/dashboard/{quote(name, safe='')}")


# ---- header, sample ratio, totals ----------------------------------------------------------
def _header(rep: Mapping[str, Any], now: datetime) -> str:
    name, days = rep["experiment"], list(rep["days"])
    span = f"{len(days)} day{'s' * (len(days) != 1)}"
    if days:
        span += f" ({escape(days[0])} to {escape(days[-1])}, UTC)"
    level = f"{rep['total']['confidence']:.0%}"
    return (f'<h1>Experiment <span id="experiment">{escape(name)}</span></h1>'
            f'<p class="meta">control arm <strong>{escape(rep["control"])}</strong> · {span} · '
            f"{level} intervals · generated {now.strftime('%Y-%m-%d %H:%M:%S')} UTC · "
            f'<a href="/v1/experiments/{quote(name, safe="")}/report">JSON report</a> · '
            '<a href="/dashboard">all experiments</a></p>')


def _srm(srm: Mapping[str, Any]) -> str:
    users = ", ".join(f"{escape(a)} {o:,} (expected {srm['expected'][a]:,.0f})"
                      for a, o in srm["observed"].items())
    if srm["p_value"] is None:
        return f'<p class="srm untestable" id="srm">Sample ratio: not testable ({users}).</p>'
    chi2 = "∞" if srm["chi2"] is None else f"{srm['chi2']:.2f}"
    figures = f"χ² = {chi2}, p = {srm['p_value']:.3g}; users {users}"
    if srm["flagged"]:
        return (f'<p class="srm flagged" id="srm" data-flagged="true">Sample ratio mismatch: '
                f"{figures} (p &lt; {srm['alpha']}). Users per arm do not match the configured "
                "weights: assignment or logging is broken; do not trust these comparisons.</p>")
    return f'<p class="srm ok" id="srm" data-flagged="false">Sample ratio OK: {figures}.</p>'


def _totals(total: Mapping[str, Any]) -> str:
    level = f"{total['confidence']:.0%}"
    head = ("<tr><th class=name>arm</th><th>users</th><th>impressions</th><th>downloads</th>"
            f"<th>CTR [{level} CI]</th><th>CVR [{level} CI]</th><th>CTR uplift [CI]</th>"
            "<th>p</th><th>CVR uplift [CI]</th><th>p</th></tr>")
    rows = "".join(_total_row(a, e, a == total["control"]) for a, e in total["arms"].items())
    notes = "; ".join(f"{k.upper()}: {escape(v)}" for k, v in total["methods"].items())
    return (f'<h2>Totals</h2><div class="wide"><table id="totals">{head}{rows}</table></div>'
            f'<p class="note">Each user once, with their days summed. {notes}.</p>')


def _total_row(arm: str, e: Mapping[str, Any], control: bool) -> str:
    attrs = (f'data-arm="{escape(arm)}" data-users="{e["users"]}" '
             f'data-impressions="{e["impressions"]}" data-downloads="{e["downloads"]}" '
             f'data-ctr="{_raw(e["ctr"]["value"])}" data-cvr="{_raw(e["cvr"]["value"])}" '
             f'data-control="{str(control).lower()}"')
    cells = [f'<td class="name">{escape(arm)}{" (control)" * control}</td>',
             f'<td class="users">{e["users"]:,}</td>',
             f'<td class="impressions">{e["impressions"]:,}</td>',
             f'<td class="downloads">{e["downloads"]:,}</td>',
             _cell(e["ctr"], _pct), _cell(e["cvr"], _rate)]
    if e["uplift"] is None:
        cells.append('<td colspan="4" class="text">control</td>')
    else:
        for key in ("ctr", "cvr"):
            u = e["uplift"][key]
            cells += [_cell(u, _signed), _p_cell(u["p_value"])]
    return f"<tr {attrs}>{''.join(cells)}</tr>"


# ---- charts --------------------------------------------------------------------------------
def _charts(rep: Mapping[str, Any], records: list[dict[str, Any]]) -> str:
    days = list(rep["days"])
    x_range, ticks = _day_axis(days)
    markers = [m for m in map(_marker, records) if m is not None]
    arms = list(rep["total"]["arms"])
    charts = [line_chart(f"{title} per day, {rep['total']['confidence']:.0%} interval bands",
                         [_series(rep, arm, key, fmt, i) for i, arm in enumerate(arms)],
                         x_range, ticks, fmt, markers, chart_id=key)
              for key, title, fmt in (("ctr", "CTR", _pct_axis), ("cvr", "CVR", _rate))]
    note = ('<p class="note">Dashed lines: deployments, canaries, promotions and rollbacks of '
            "this experiment (hover for details; all of them are listed below).</p>")
    return "<h2>Daily CTR and CVR</h2>" + "".join(charts) + note


def _day_axis(days: list[str]) -> tuple[tuple[float, float], list[tuple[float, str]]]:
    """x = days since 0001-01-01: a day spans [d, d + 1), its point sits at its middle."""
    ordinals = [date.fromisoformat(d).toordinal() for d in days]
    step = math.ceil(len(days) / 14)
    short = len(days) > 7
    ticks = [(o + 0.5, d[5:] if short else d)
             for i, (o, d) in enumerate(zip(ordinals, days, strict=True)) if i % step == 0]
    return (ordinals[0], ordinals[-1] + 1), ticks


def _series(rep: Mapping[str, Any], arm: str, key: str, fmt: Callable[[float], str],
            index: int) -> Series:
    """One arm's daily points; arm i sits DODGE·(i − centre) days off the day's middle."""
    arms, points = len(rep["total"]["arms"]), []
    for day, r in rep["days"].items():
        e = r["arms"][arm]
        est = e[key]
        tip = (f"{arm} {day}: {key.upper()} {_interval(est, fmt)}; "
               f"{e['users']:,} users, {e['impressions']:,} impressions, "
               f"{e['downloads']:,} downloads")
        x = date.fromisoformat(day).toordinal() + 0.5 + DODGE * (index - (arms - 1) / 2)
        points.append(Point(x, est["value"], est["lo"], est["hi"], key=day, tooltip=tip))
    return Series(arm, points, PALETTE[index % len(PALETTE)])


def _marker(record: Mapping[str, Any]) -> Marker | None:
    try:
        when = datetime.fromisoformat(str(record["when"])).astimezone(UTC)
    except (KeyError, ValueError):
        return None
    midnight = datetime(when.year, when.month, when.day, tzinfo=UTC)
    x = when.toordinal() + (when - midnight).total_seconds() / DAY_SECONDS
    tip = (f"{record['when']} {record.get('kind')} {record.get('arm')}: {record.get('from')} -> "
           f"{record.get('to')} by {record.get('who')}")
    if record.get("why"):
        tip += f" ({record['why']})"
    return Marker(x, f"{record.get('kind')} {record.get('arm')}", tip)


# ---- serving now, history, per day ---------------------------------------------------------
def _serving(serving: Mapping[str, Any]) -> str:
    head = ("<tr><th class=name>arm</th><th>weight</th><th class=name>bundle</th>"
            "<th class=name>model version</th><th class=name>canary</th></tr>")
    rows = "".join(_serving_row(a) for a in serving["arms"])
    holdout = (f'<p class="note">Holdout: {serving["holdout"]:.1%} of users get the control '
               "model and are not counted.</p>") if serving.get("holdout") else ""
    return f'<h2>Serving now</h2><table id="serving">{head}{rows}</table>{holdout}'


def _serving_row(arm: Mapping[str, Any]) -> str:
    canary = arm.get("canary")
    text = "none"
    if canary:
        text = (f"{escape(canary['bundle'])} (version {escape(canary['model_version'])}) "
                f"serves {canary['share']:.2%} of the arm's users")
    return (f'<tr data-arm="{escape(arm["name"])}" '
            f'data-model-version="{escape(arm["model_version"])}" '
            f'data-canary="{escape(canary["bundle"]) if canary else ""}">'
            f'<td class="name">{escape(arm["name"])}{" (control)" * bool(arm["control"])}</td>'
            f"<td>{arm['weight']:.2%}</td><td class=name>{escape(arm['bundle'])}</td>"
            f"<td class=name>{escape(arm['model_version'])}</td>"
            f'<td class="text canary">{text}</td></tr>')


def _history(records: list[dict[str, Any]]) -> str:
    if not records:
        return ('<h2>Deployment history</h2><p id="history" class="note">No deployment, '
                "canary, promotion or rollback recorded for this experiment.</p>")
    head = "".join(f"<th class=name>{h}</th>" for h in
                   ("when (UTC)", "kind", "arm", "from", "to", "canary", "who", "why"))
    rows = "".join(_history_row(r) for r in reversed(records))
    return (f'<h2>Deployment history</h2><p class="note">Newest first.</p>'
            f'<table id="history"><tr>{head}</tr>{rows}</table>')


def _history_row(r: Mapping[str, Any]) -> str:
    cells = [r.get("when"), r.get("kind"), r.get("arm"), r.get("from"), r.get("to"),
             _canary_note(r), r.get("who")]
    tds = "".join(f'<td class="name">{escape(str(c or ""))}</td>' for c in cells)
    tds += f'<td class="text">{escape(str(r.get("why") or ""))}</td>'
    return f'<tr data-kind="{escape(str(r.get("kind", "")))}">{tds}</tr>'


def _canary_note(r: Mapping[str, Any]) -> str:
    if "ended_canary" in r:
        ended = r["ended_canary"]
        return f"ended {ended.get('bundle')} at {_share(ended.get('share'))}"
    if "share" not in r:
        return ""
    verb = {"canary": "at", "promote": "promoted from", "rollback": "removed at"}
    return f"{verb.get(str(r.get('kind')), 'at')} {_share(r['share'])}"


def _days(rep: Mapping[str, Any]) -> str:
    head = ("<tr><th class=name>day</th><th class=name>arm</th><th>users</th>"
            "<th>impressions</th><th>downloads</th><th>CTR [CI]</th><th>CVR [CI]</th>"
            "<th>CTR uplift [CI]</th><th>sample ratio p</th></tr>")
    rows = []
    for day, r in rep["days"].items():
        arms = list(r["arms"].items())
        srm = r["srm"]["p_value"]
        for i, (arm, e) in enumerate(arms):
            lead = (f'<td class="name" rowspan="{len(arms)}">{escape(day)}</td>' if i == 0
                    else "")
            tail = _p_cell(srm, len(arms), r["srm"]["alpha"]) if i == 0 else ""
            uplift = _cell(e["uplift"]["ctr"], _signed) if e["uplift"] else "<td>control</td>"
            rows.append(f'<tr data-day="{escape(day)}" data-arm="{escape(arm)}">{lead}'
                        f'<td class="name">{escape(arm)}</td><td>{e["users"]:,}</td>'
                        f"<td>{e['impressions']:,}</td><td>{e['downloads']:,}</td>"
                        f"{_cell(e['ctr'], _pct)}{_cell(e['cvr'], _rate)}{uplift}{tail}</tr>")
    return ('<h2>Per day</h2><details><summary>Each day on its own (the figures behind the '
            f'charts)</summary><div class="wide"><table id="days">{head}{"".join(rows)}'
            "</table></div></details>")


# ---- number formats ------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{v:.3%}"


def _pct_axis(v: float) -> str:
    return f"{v * 100:.3g}%"


def _rate(v: float) -> str:
    return f"{v:.4g}"


def _signed(v: float) -> str:
    return f"{v:+.2%}"


def _share(v: Any) -> str:
    return f"{float(v):.2%}" if isinstance(v, int | float) else "?"


def _raw(v: float | None) -> str:
    return "" if v is None else repr(v)


def _interval(est: Mapping[str, Any], fmt: Callable[[float], str]) -> str:
    """"value [lo, hi]", "value [n/a]" or "n/a" (plain text)."""
    if est["value"] is None:
        return "n/a"
    if est["lo"] is None or est["hi"] is None:
        return f"{fmt(est['value'])} [n/a]"
    return f"{fmt(est['value'])} [{fmt(est['lo'])}, {fmt(est['hi'])}]"


def _cell(est: Mapping[str, Any], fmt: Callable[[float], str]) -> str:
    """A table cell: the value, and its interval below it."""
    if est["value"] is None:
        return "<td>n/a</td>"
    ci = "n/a" if est["lo"] is None or est["hi"] is None else (
        f"{fmt(est['lo'])}, {fmt(est['hi'])}")
    return f'<td>{escape(fmt(est["value"]))}<br><span class="ci">[{escape(ci)}]</span></td>'


def _p_cell(p: float | None, rowspan: int = 1, alpha: float = 0.05) -> str:
    """A p-value cell, bold below `alpha`."""
    span = f' rowspan="{rowspan}"' if rowspan > 1 else ""
    if p is None:
        return f"<td{span}>n/a</td>"
    text = "&lt;0.0001" if p < 1e-4 else f"{p:.4f}"
    cls = ' class="sig"' if p < alpha else ""
    return f"<td{span}{cls}>{text}</td>"
