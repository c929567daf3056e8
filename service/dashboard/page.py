"""The dashboard's HTML pages: one per experiment, the list of experiments, and the 404.

`experiment_page` takes the report of `service.counts.build_report` (`{"days": {day: report},
"total": report}`), the experiment as `GET /v1/experiments` describes it (arms, bundles, model
versions, canaries), the experiment's deployment history records, the clock the counts are
dated by and the first serving day of retrain deployments (`timeline.serving_days`). It returns
the page in the order a reader needs it: a verdict per treatment arm (from the always-valid
intervals, safe to read every day), the sample-ratio check, totals with the fixed-horizon and
the always-valid intervals, daily CTR and CVR charts on the experiment's own days with the
deployments marked, the per-day figures, what each arm serves now, and the deployment history.
The guardrails (latency p99, error share, calibration per arm: the report's "guardrails") follow
the sample-ratio check, with each arm's breached days flagged; they show even before any event
is counted, as an arm whose every request fails counts none. The list metrics of the DeepFM
paper's online evaluation (personalization@L, coverage@L, popularity@L per arm, over all days
and per day: the report's "list_metrics", which the drainer computes from the Parquet logs)
follow the per-day figures; before a drain has computed them, a line says when they appear.
Plain functions of plain data: no I/O here.

Minimum samples: a day on which an arm has fewer than MIN_DAY_USERS users or
MIN_DAY_IMPRESSIONS impressions is drawn hollow, without its interval, and does not set the
chart's scale: its normal interval is not trustworthy with so few users, and one user's 1 of 2
(CTR 50%) would otherwise squash every real day into the bottom of the chart. The sample-ratio
check is shown from MIN_SRM_USERS users (all arms together): below that its chi-square
approximation is poor and it could only catch an absurd mismatch, so "users lr 1 (expected 0)"
would read as a finding while it is noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from ctrserve.service.counts import LISTS_ABSENT
from ctrserve.service.dashboard.svg import PALETTE, Marker, Point, Series, Shade, line_chart
from ctrserve.service.dashboard.timeline import DayAxis, Placement, place

MIN_DAY_USERS = 100  # per arm and day: fewer draws the day hollow, off the chart's scale
MIN_DAY_IMPRESSIONS = 100  # likewise, per arm and day
MIN_SRM_USERS = 100  # users of all arms together before the sample-ratio check is shown
WHY_CHARS = 120  # longer reasons are cut in the history table; the full text is its tooltip
DODGE = 0.04  # days between the points of two arms on one day
CLUSTER = 0.15  # days: deployments closer than this share one marker
LIST_DAYS_OPEN = 14  # the list metrics' per-day table starts open up to this many days
CVR_LABEL = "CVR (downloads per user)"  # the one name of downloads / users, everywhere
METRICS = (("ctr", "CTR"), ("cvr", CVR_LABEL))
CLOCKS = {"server": "UTC days of the scorer's clock",
          "client": "UTC days of each request's own time (clock=client: simulated or "
                    "backfilled days)"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#1b1b1b}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta,.note{color:#555;font-size:13px}a{color:#0b5cad}
table{border-collapse:collapse;margin:6px 0;font-variant-numeric:tabular-nums}
#totals{font-size:13px}#totals td,#totals th{padding:4px 6px}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.name,th.name,td.text{text-align:left}th.group{text-align:center}
th.group,th.wrap{white-space:normal}
td,th{white-space:nowrap}td.text{white-space:normal}.ci{color:#555;font-size:12px}
.wide{overflow-x:auto}
.verdicts{margin:12px 0;padding:8px 12px;border:1px solid #cfd8e3;border-radius:4px;
background:#f7f9fc}.verdict{margin:4px 0;font-size:15px}
.decision{font-weight:600;padding:0 4px;border-radius:3px}
.decision.better{background:#d8f0d8}.decision.worse{background:#fbd5d3}
.decision.keep{background:#ececec}
.srm{padding:8px 12px;border-radius:4px;margin:12px 0}
.srm.ok{background:#eaf6ea}.srm.flagged{background:#fde2e1;border:2px solid #c62828;
font-weight:600}.srm.untestable{background:#f1f1f1}
td.breached{background:#fde2e1;color:#8e1c1c;font-weight:600}
.guard{padding:8px 12px;border-radius:4px;margin:12px 0}.guard.ok{background:#eaf6ea}
.guard.flagged{background:#fde2e1;border:2px solid #c62828;font-weight:600}
.empty{padding:16px;background:#fff8e1;border:1px solid #e0c060;border-radius:4px}
.chart{max-width:100%;height:auto;display:block;margin:8px 0}
.chart .grid{stroke:#e4e4e4}.chart .axis{stroke:#888}
.chart .tick,.chart .legend,.chart .marker-label{font-size:11px;fill:#444}
.chart .chart-title{font-size:13px;font-weight:600;fill:#1b1b1b}
.sig{font-weight:600}tr.small td{color:#777}
.why{min-width:18em;max-width:34em;white-space:normal;overflow-wrap:break-word}
.placed{min-width:11em;max-width:15em;white-space:normal}
"""


def experiment_page(rep: Mapping[str, Any], serving: Mapping[str, Any],
                    records: list[dict[str, Any]], now: datetime | None = None,
                    clock: str = "server", serving_days: Mapping[int, str] | None = None
                    ) -> str:
    """The dashboard of one experiment."""
    name = rep["experiment"]
    axis = DayAxis.of(list(rep["days"]))
    placements = [place(r, axis, clock, serving_days or {}) for r in records]
    body = [_header(rep, now or datetime.now(UTC), clock)]
    guard = _guardrails(rep.get("guardrails"))
    if rep["days"]:
        total = rep["total"]
        body += [_verdicts(total), _srm(total["srm"]), guard, _totals(total),
                 _charts(rep, axis, records, placements), _days(rep),
                 _lists(rep.get("list_metrics"))]
    else:
        body.append('<section class="empty" id="no-data"><strong>No data yet.</strong> No '
                    "scored request of this experiment has been counted. Figures appear once "
                    "clients score with it and send impressions and downloads to "
                    "<code>POST /v1/events</code>.</section>")
        body += [guard, _lists(rep.get("list_metrics"))]
    body += [_serving(serving), _history(records, placements)]
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


# ---- header, verdict, sample ratio, totals -------------------------------------------------
def _header(rep: Mapping[str, Any], now: datetime, clock: str) -> str:
    name, days = rep["experiment"], list(rep["days"])
    span = f"{len(days)} day{'s' * (len(days) != 1)} with data"
    if days:
        span += f" ({escape(days[0])} to {escape(days[-1])}; {CLOCKS.get(clock, clock)})"
    level = f"{rep['total']['confidence']:.0%}"
    return (f'<h1>Experiment <span id="experiment">{escape(name)}</span></h1>'
            f'<p class="meta">control arm <strong>{escape(rep["control"])}</strong> · {span} · '
            f"{level} intervals · generated {now.strftime('%Y-%m-%d %H:%M:%S')} UTC · "
            f'<a href="/v1/experiments/{quote(name, safe="")}/report">JSON report</a> · '
            '<a href="/dashboard">all experiments</a></p>')


def _verdicts(total: Mapping[str, Any]) -> str:
    """One line per treatment arm from the report's sequential decision, and its caveats."""
    level, control = f"{total['confidence']:.0%}", total["control"]
    arms = [(a, e) for a, e in total["arms"].items() if e.get("decision")]
    lines = "".join(_verdict(a, e, control, level) for a, e in arms)
    notes = [f"From the always-valid {level} intervals of the uplift over all days (each user "
             "once): they hold at every look, so reading this page daily and acting on it is "
             "safe. <em>keep running</em>: the interval still includes 0."]
    if len(arms) > 1:
        verdicts = len(arms) * len(METRICS)
        notes.append(f"<strong>{len(arms)} treatments share the control {escape(control)}: the "
                     f"intervals are per comparison.</strong> Each covers its own uplift with "
                     f"{level} confidence, but of these {verdicts} verdicts the chance that at "
                     f"least one is wrong can reach {verdicts} × {1 - total['confidence']:.0%} "
                     f"= {min(verdicts * (1 - total['confidence']), 1):.0%}: read a lone "
                     "\"better\" or \"worse\" among them with care.")
    if total["srm"]["flagged"] and _srm_users(total["srm"]) >= MIN_SRM_USERS:
        notes.append("<strong>The sample ratio is off (below): do not act on these verdicts "
                     "until assignment or logging is fixed.</strong>")
    return (f'<h2>Verdict</h2><div class="verdicts" id="verdict">{lines}'
            f'<p class="note">{" ".join(notes)}</p></div>')


def _verdict(arm: str, e: Mapping[str, Any], control: str, level: str) -> str:
    parts = "; ".join(_verdict_part(label, e["uplift"][key], e["decision"][key], level)
                      for key, label in METRICS)
    attrs = "".join(f' data-{key}-decision="{escape(e["decision"][key])}"' for key, _ in METRICS)
    return (f'<p class="verdict" data-arm="{escape(arm)}"{attrs}><strong>{escape(arm)} vs '
            f"{escape(control)}</strong>: {parts}</p>")


def _verdict_part(label: str, uplift: Mapping[str, Any], decision: str, level: str) -> str:
    seq = uplift["sequential"]
    if uplift["value"] is None or seq["lo"] is None or seq["hi"] is None:
        figure = f"{label} n/a (too little data for an interval)"
    else:
        figure = (f"{label} {_short(uplift['value'])} (always-valid {level} CI "
                  f"{_short(seq['lo'])} to {_short(seq['hi'])})")
    cls = {"treatment better": "better", "treatment worse": "worse"}.get(decision, "keep")
    return f'{escape(figure)}: <span class="decision {cls}">{escape(decision)}</span>'


def _srm_users(srm: Mapping[str, Any]) -> int:
    return sum(srm["observed"].values())


def _srm(srm: Mapping[str, Any]) -> str:
    n = _srm_users(srm)
    if n < MIN_SRM_USERS:
        return (f'<p class="srm untestable" id="srm-note">Sample-ratio check: shown from '
                f"{MIN_SRM_USERS} users on ({n:,} so far); with fewer it cannot tell broken "
                "assignment from chance.</p>")
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


GUARDRAILS = (("latency_p99_ms", "latency p99"), ("error_share", "error share"),
              ("calibration", "calibration"))


def _guardrails(guard: Mapping[str, Any] | None) -> str:
    """Per arm: each guardrail over all days and the days it was breached on (flagged)."""
    if not guard or not guard["days"]:
        return ""
    arms = list(guard["total"])
    rows = "".join(_guard_row(arm, guard["total"][arm], guard["breached"]) for arm in arms)
    head = "".join(f"<th>{label}<br>all days · days breached</th>" for _, label in GUARDRAILS)
    t, minimum = guard["thresholds"], guard["minimum"]
    low, high = t["calibration"]
    limits = (f"p99 at most {t['latency_p99_ms']:g} ms, error share at most "
              f"{t['error_share']:.2%}, calibration within [{low:g}, {high:g}]")
    return (f"<h2>Guardrails</h2>{_guard_summary(guard, arms)}<div class=\"wide\">"
            f'<table id="guardrails"><tr><th class=name>arm</th>{head}</tr>{rows}</table></div>'
            f'<p class="note">Limits from the experiment\'s config: {escape(limits)}. Per arm '
            "and day of the scored requests, holdout excluded. Latency: scorer time, failed "
            "requests included; errors: 5xx after the arm was chosen, over its scored "
            "requests; calibration: mean predicted probability of the returned items over "
            "downloads per impression (assumes the returned items are the ones shown; today's "
            f"reads high until its downloads are in). Judged from {minimum['requests']} "
            f"requests (latency, errors) or {minimum['downloads']} downloads (calibration) "
            "that day.</p>")


def _guard_summary(guard: Mapping[str, Any], arms: list[str]) -> str:
    """One line: the arms with a breach, else OK, else not judged yet (too little traffic)."""
    breaches = guard["breached"]
    if breaches:
        hit = sorted({b["arm"] for b in breaches}, key=arms.index)
        return (f'<p class="guard flagged" id="guardrail-summary" data-breached="true">'
                f"Guardrails breached ({len(breaches)} arm-day{'s' * (len(breaches) != 1)}): "
                f"{escape(', '.join(hit))}. Check the arm's latency, errors and calibration "
                "before trusting its uplift.</p>")
    judged = any(e[name]["breached"] is not None for by_arm in guard["days"].values()
                 for e in by_arm.values() for name, _ in GUARDRAILS)
    if judged:
        return ('<p class="guard ok" id="guardrail-summary" data-breached="false">'
                "Guardrails OK: no arm breached one on a day with enough traffic.</p>")
    return ('<p class="srm untestable" id="guardrail-summary" data-breached="">'
            "Guardrails not judged yet: no arm had enough traffic on a day.</p>")


def _guard_row(arm: str, total: Mapping[str, Any], breaches: list[dict[str, Any]]) -> str:
    hit = {name: [b["day"] for b in breaches if b["arm"] == arm and b["guardrail"] == name]
           for name, _ in GUARDRAILS}
    flagged = " ".join(name for name, days in hit.items() if days)
    cells = "".join(_guard_cell(name, total[name], hit[name]) for name, _ in GUARDRAILS)
    return (f'<tr data-guard-arm="{escape(arm)}" data-breached="{escape(flagged)}">'
            f'<td class="name">{escape(arm)}</td>{cells}</tr>')


def _guard_cell(name: str, entry: Mapping[str, Any], days: list[str]) -> str:
    fmt = {"latency_p99_ms": lambda v: f"{v:.1f} ms", "error_share": lambda v: f"{v:.2%}",
           "calibration": lambda v: f"{v:.3f}"}[name]
    value = "n/a" if entry["value"] is None else fmt(entry["value"])
    if not days:
        return f'<td data-guardrail="{name}">{value}<br><span class="ci">none</span></td>'
    listed = ", ".join(days)
    return (f'<td class="breached" data-guardrail="{name}">{value}<br>'
            f"<span>{escape(listed)}</span></td>")


def _totals(total: Mapping[str, Any]) -> str:
    level = f"{total['confidence']:.0%}"
    first = ("<tr><th class=name rowspan=2>arm</th><th rowspan=2>users</th>"
             "<th rowspan=2>impressions</th><th rowspan=2>downloads</th>"
             f"<th rowspan=2>CTR<br>[{level} CI]</th>"
             f"<th rowspan=2 class=wrap>{CVR_LABEL} [{level} CI]</th>"
             "<th colspan=2 class=group>CTR uplift</th>"
             f"<th colspan=2 class=group>{CVR_LABEL} uplift</th></tr>")
    sub = f"<th>fixed-horizon<br>[{level} CI], p</th><th>always-valid<br>[{level} CI]</th>"
    rows = "".join(_total_row(a, e, a == total["control"]) for a, e in total["arms"].items())
    names = dict(METRICS)
    notes = "; ".join(f"{names.get(k, k.upper())}: {escape(v)}"
                      for k, v in total["methods"].items())
    return (f'<h2>Totals</h2><div class="wide"><table id="totals">{first}<tr>{sub * 2}</tr>'
            f'{rows}</table></div><p class="note">Each user once, with their days summed. '
            "Fixed-horizon interval and p: valid only read once, at an end planned in advance. "
            f"Always-valid interval: valid at every look (the verdict uses it). {notes}.</p>")


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
        for key, _ in METRICS:
            u = e["uplift"][key]
            cells += [_uplift_cell(u), _bounds_cell(u["sequential"], key)]
    return f"<tr {attrs}>{''.join(cells)}</tr>"


def _uplift_cell(u: Mapping[str, Any]) -> str:
    """The uplift, its fixed-horizon interval and p (bold below 5%)."""
    if u["value"] is None:
        return "<td>n/a</td>"
    ci = "n/a" if u["lo"] is None or u["hi"] is None else f"{_bound(u['lo'])}, {_bound(u['hi'])}"
    p = u["p_value"]
    p_text = "n/a" if p is None else "&lt;0.0001" if p < 1e-4 else f"{p:.4f}"
    sig = ' class="sig"' if p is not None and p < 0.05 else ""
    return (f"<td>{_signed(u['value'])}<br><span class=\"ci\">[{ci}]<br>"
            f"p <span{sig}>{p_text}</span></span></td>")


def _bounds_cell(seq: Mapping[str, Any], key: str) -> str:
    if seq["lo"] is None or seq["hi"] is None:
        return f'<td class="always-valid" data-metric="{key}">n/a</td>'
    return (f'<td class="always-valid" data-metric="{key}">[{_bound(seq["lo"])}, '
            f'{_bound(seq["hi"])}]<br><span class="ci">{escape(seq["decision"])}</span></td>')


# ---- charts --------------------------------------------------------------------------------
def _charts(rep: Mapping[str, Any], axis: DayAxis, records: list[dict[str, Any]],
            placements: list[Placement]) -> str:
    level = f"{rep['total']['confidence']:.0%}"
    markers = _markers(records, placements)
    shades = [Shade(g.x0, g.x1, f"no data\n{g.days} d", f"no data: {g.first} to {g.last}")
              for g in axis.gaps]
    arms = list(rep["total"]["arms"])
    charts = [line_chart(f"{title} per day, {level} interval bands",
                         [_series(rep, axis, arm, key, fmt, i) for i, arm in enumerate(arms)],
                         (0.0, axis.end), axis.ticks(), fmt, markers, chart_id=key,
                         shades=shades)
              for key, title, fmt in (("ctr", "CTR", _pct_axis), ("cvr", CVR_LABEL, _rate))]
    note = (f'<p class="note">The days are the counts\' days. Hollow points: an arm with fewer '
            f"than {MIN_DAY_USERS} users or {MIN_DAY_IMPRESSIONS} impressions that day, too few "
            "to read: drawn without interval, not joined by the line and not setting the scale "
            "(one above it sits on the top edge as a triangle). Grey: days without data, "
            "squeezed; no line crosses them. Dashed lines: deployments, canaries, promotions and "
            "rollbacks on those same days (hover for details; the history below says where each "
            "one is drawn, or why it is not).</p>")
    return f"<h2>Daily CTR and {CVR_LABEL}</h2>" + "".join(charts) + note


def _series(rep: Mapping[str, Any], axis: DayAxis, arm: str, key: str,
            fmt: Callable[[float], str], index: int) -> Series:
    """One arm's daily points; arm i sits DODGE·(i − centre) days off the day's middle. A point
    without value stands in each gap, so that no line joins the days around it."""
    arms, points = len(rep["total"]["arms"]), []
    offset = 0.5 + DODGE * (index - (arms - 1) / 2)
    previous = None
    for day, r in rep["days"].items():
        start = axis.starts[day]
        if previous is not None and start - previous > 1.0:
            points.append(Point(previous + 1.0, None, key="gap"))
        points.append(_point(day, r["arms"][arm], arm, key, fmt, start + offset))
        previous = start
    return Series(arm, points, PALETTE[index % len(PALETTE)])


def _point(day: str, e: Mapping[str, Any], arm: str, key: str, fmt: Callable[[float], str],
           x: float) -> Point:
    small = e["users"] < MIN_DAY_USERS or e["impressions"] < MIN_DAY_IMPRESSIONS
    label = CVR_LABEL if key == "cvr" else "CTR"
    tip = (f"{arm} {day}: {label} {_interval(e[key], fmt)}; {e['users']:,} users, "
           f"{e['impressions']:,} impressions, {e['downloads']:,} downloads")
    if small:
        tip += (f" (fewer than {MIN_DAY_USERS} users or {MIN_DAY_IMPRESSIONS} impressions: "
                "too few to read)")
    est = e[key]
    return Point(x, est["value"], est["lo"], est["hi"], key=day, tooltip=tip, small=small)


def _markers(records: list[dict[str, Any]], placements: list[Placement]) -> list[Marker]:
    """One marker per cluster of deployments less than CLUSTER days apart."""
    placed = sorted(((p.x, r) for r, p in zip(records, placements, strict=True)
                     if p.x is not None), key=lambda pair: pair[0])
    clusters: list[list[tuple[float, dict[str, Any]]]] = []
    for x, r in placed:
        if clusters and x - clusters[-1][0][0] < CLUSTER:
            clusters[-1].append((x, r))
        else:
            clusters.append([(x, r)])
    return [_marker(c) for c in clusters]


def _marker(cluster: list[tuple[float, dict[str, Any]]]) -> Marker:
    records = [r for _, r in cluster]
    kinds = {str(r.get("kind")) for r in records}
    if len(records) == 1:
        label = f"{records[0].get('kind')} {records[0].get('arm')}"
    else:
        label = f"{len(records)} {next(iter(kinds))}s" if len(kinds) == 1 else (
            f"{len(records)} changes")
    return Marker(cluster[0][0], label, "\n".join(_marker_tip(r) for r in records))


def _marker_tip(r: Mapping[str, Any]) -> str:
    tip = (f"{r.get('when')} {r.get('kind')} {r.get('arm')}: {r.get('from')} -> {r.get('to')} "
           f"by {r.get('who')}")
    return tip + (f" ({r['why']})" if r.get("why") else "")


# ---- per day, serving now, history ---------------------------------------------------------
def _days(rep: Mapping[str, Any]) -> str:
    head = ("<tr><th class=name>day</th><th class=name>arm</th><th>users</th>"
            f"<th>impressions</th><th>downloads</th><th>CTR [CI]</th>"
            f"<th class=wrap>{CVR_LABEL} [CI]</th><th>CTR uplift [CI]<br>(fixed-horizon)</th>"
            "<th>sample<br>ratio p</th></tr>")
    rows = [row for day, r in rep["days"].items() for row in _day_rows(day, r)]
    return ('<h2>Per day</h2><details open><summary>Each day on its own (the figures behind '
            f'the charts)</summary><div class="wide"><table id="days">{head}{"".join(rows)}'
            f'</table></div><p class="note">Grey rows: fewer than {MIN_DAY_USERS} users or '
            f"{MIN_DAY_IMPRESSIONS} impressions. Sample ratio p from {MIN_SRM_USERS} users that "
            "day.</p></details>")


def _day_rows(day: str, r: Mapping[str, Any]) -> list[str]:
    arms = list(r["arms"].items())
    rows = []
    for i, (arm, e) in enumerate(arms):
        lead = f'<td class="name" rowspan="{len(arms)}">{escape(day)}</td>' if i == 0 else ""
        tail = _day_srm(r["srm"], len(arms)) if i == 0 else ""
        uplift = _cell(e["uplift"]["ctr"], _signed) if e["uplift"] else "<td>control</td>"
        small = e["users"] < MIN_DAY_USERS or e["impressions"] < MIN_DAY_IMPRESSIONS
        rows.append(f'<tr data-day="{escape(day)}" data-arm="{escape(arm)}"'
                    f'{" class=small" * small}>{lead}'
                    f'<td class="name">{escape(arm)}</td><td>{e["users"]:,}</td>'
                    f"<td>{e['impressions']:,}</td><td>{e['downloads']:,}</td>"
                    f"{_cell(e['ctr'], _pct)}{_cell(e['cvr'], _rate)}{uplift}{tail}</tr>")
    return rows


def _day_srm(srm: Mapping[str, Any], rowspan: int) -> str:
    if _srm_users(srm) < MIN_SRM_USERS:
        return f'<td rowspan="{rowspan}" class="ci">too few users</td>'
    return _p_cell(srm["p_value"], rowspan, srm["alpha"])


LIST_METRICS = (
    ("personalization", "personalization@L", lambda v: f"{v:.3f}",
     "1 − the mean share of their top L that two users' lists have in common: 0 when everyone "
     "gets the same list, 1 when no two lists share an item"),
    ("coverage", "coverage@L", lambda v: f"{v:.1%}",
     "the share of the catalogue in anyone's top L"),
    ("popularity", "popularity@L", lambda v: f"{v:.3%}",
     "the mean share of the period's downloads that the top-L items have (1/catalogue: a "
     "uniform choice; higher: more popular items)"))


def _lists(lists: Mapping[str, Any] | None) -> str:
    """The list metrics per arm over all days, then per day; or when they will appear."""
    title = "<h2>Lists: personalization@L, coverage@L, popularity@L</h2>"
    if lists is None:
        return (f'{title}<p class="note" id="lists-absent">The DeepFM paper\'s list metrics '
                f"of each arm's top-L lists: {escape(LISTS_ABSENT)}.</p>")
    if not lists["total"]:
        return (f'{title}<p class="note" id="lists-none">No list served outside the holdout in '
                "the drained logs.</p>")
    head = ("<tr><th class=name>days</th><th class=name>arm</th><th>users</th><th>L</th>"
            + "".join(f'<th title="{escape(text)}">{label}</th>'
                      for _, label, _, text in LIST_METRICS) + "</tr>")
    total = "".join(_list_row("all", arm, m) for arm, m in lists["total"].items())
    days = "".join(_list_row(day, arm, m) for day, by_arm in lists["days"].items()
                   for arm, m in by_arm.items())
    opened = " open" * (len(lists["days"]) <= LIST_DAYS_OPEN)
    return (f'{title}<div class="wide"><table id="lists">{head}{total}</table></div>'
            f"<details{opened}><summary>Each day on its own</summary><div class=\"wide\">"
            f'<table id="lists-days">{head}{days}</table></div></details>{_lists_note(lists)}')


def _list_row(period: str, arm: str, m: Mapping[str, Any]) -> str:
    attrs = "".join(f' data-{key}="{_raw(m[key])}"' for key, *_ in LIST_METRICS)
    cells = "".join(f"<td>{'n/a' if m[key] is None else fmt(m[key])}</td>"
                    for key, _, fmt, _ in LIST_METRICS)
    label = "all days" if period == "all" else period
    return (f'<tr data-period="{escape(period)}" data-arm="{escape(arm)}" '
            f'data-list-users="{m["users"]}" data-top="{m["top"]}"{attrs}>'
            f'<td class="name">{escape(label)}</td><td class="name">{escape(arm)}</td>'
            f'<td>{m["users"]:,}</td><td>{m["top"]}</td>{cells}</tr>')


def _lists_note(lists: Mapping[str, Any]) -> str:
    size = lists["catalogue"]["size"]
    computed = lists.get("computed") or {}
    definitions = "".join(f"<li><strong>{label}</strong>: {escape(text)}</li>"
                          for _, label, _, text in LIST_METRICS)
    return (f'<ul class="note" id="lists-definitions">{definitions}</ul>'
            f'<p class="note" id="lists-note">Of each user\'s last list (over all days: their '
            f"last one; per day: that day's), its first L = {lists['top']} items (L capped at "
            f"the longest list), holdout users left out. Catalogue: "
            f"{'n/a' if size is None else f'{size:,}'} items "
            f"({escape(lists['catalogue']['basis'])}); popularity: "
            f"{escape(lists['popularity_basis'])}, {lists['downloads']:,} downloads. "
            f"Computed from the drained Parquet logs at the last drain "
            f"({escape(str(computed.get('at', 'n/a')))}); definitions and sources: "
            "docs/experiments.md, \"List metrics\".</p>")


def _serving(serving: Mapping[str, Any]) -> str:
    head = ("<tr><th class=name>arm</th><th>weight</th><th class=name>bundle</th>"
            "<th class=name>model version</th><th class=name>canary</th></tr>")
    rows = "".join(_serving_row(a) for a in serving["arms"])
    holdout = (f'<p class="note">Holdout: {serving["holdout"]:.1%} of users get the control '
               "model and are not counted.</p>") if serving.get("holdout") else ""
    return (f'<h2>Serving now</h2><div class="wide"><table id="serving">{head}{rows}</table>'
            f"</div>{holdout}")


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


def _history(records: list[dict[str, Any]], placements: list[Placement]) -> str:
    if not records:
        return ('<h2>Deployment history</h2><p id="history" class="note">No deployment, '
                "canary, promotion or rollback recorded for this experiment.</p>")
    head = "".join(f"<th class=name>{h}</th>" for h in
                   ("when (wall clock, UTC)<br>and on the charts", "kind", "arm",
                    "from<br>→ to", "canary", "who", "why"))
    rows = "".join(_history_row(r, p) for r, p in zip(reversed(records), reversed(placements),
                                                       strict=True))
    return (f'<h2>Deployment history</h2><p class="note">Newest first.</p>'
            f'<div class="wide"><table id="history"><tr>{head}</tr>{rows}</table></div>')


def _history_row(r: Mapping[str, Any], placed: Placement) -> str:
    when = str(r.get("when") or "").replace("T", " ").removesuffix("+00:00")
    cells = [r.get("kind"), r.get("arm")]
    tds = (f'<td class="text"><div class="placed">{escape(when)}<br>'
           f'<span class="ci">charts: {escape(placed.text)}</span></div></td>'
           + "".join(f'<td class="name">{escape(str(c or ""))}</td>' for c in cells)
           + f'<td class="name">{escape(str(r.get("from") or ""))}<br>'
             f'→ {escape(str(r.get("to") or ""))}</td>'
           + f'<td class="name">{escape(_canary_note(r))}</td>'
           + f'<td class="name">{escape(str(r.get("who") or ""))}</td>'
           + _why_cell(str(r.get("why") or "")))
    return (f'<tr data-kind="{escape(str(r.get("kind", "")))}" '
            f'data-drawn="{str(placed.x is not None).lower()}">{tds}</tr>')


def _why_cell(why: str) -> str:
    """The reason, wrapping by words in a column wide enough to read; cut past WHY_CHARS with
    the whole text as its tooltip."""
    shown = why if len(why) <= WHY_CHARS else why[: WHY_CHARS - 1].rstrip() + "…"
    title = f' title="{escape(why)}"' if shown != why else ""
    return f'<td class="text"><div class="why"{title}>{escape(shown)}</div></td>'


def _canary_note(r: Mapping[str, Any]) -> str:
    if "ended_canary" in r:
        ended = r["ended_canary"]
        return f"ended {ended.get('bundle')} at {_share(ended.get('share'))}"
    if "share" not in r:
        return ""
    verb = {"canary": "at", "promote": "promoted from", "rollback": "removed at"}
    return f"{verb.get(str(r.get('kind')), 'at')} {_share(r['share'])}"


# ---- number formats ------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{v:.3%}"


def _pct_axis(v: float) -> str:
    return f"{v * 100:.3g}%"


def _rate(v: float) -> str:
    return f"{v:.4g}"


def _signed(v: float) -> str:
    return f"{v:+.2%}"


def _bound(v: float) -> str:
    """An interval's end in the totals: one decimal is all its precision is worth."""
    return f"{v:+.1%}"


def _short(v: float) -> str:
    """A signed percentage with one decimal and a true minus sign, for sentences."""
    return f"{v:+.1%}".replace("-", "−")


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
