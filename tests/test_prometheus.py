"""Prometheus config, alert rules and the Grafana dashboard (deploy/): valid for promtool, every
alert unit-tested both ways, and every metric a PromQL expression reads is one the scorer's
GET /metrics or the log drainer's metrics port (`ctrserve drain-events --follow
--metrics-port`) really exports."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import chi2, norm

from ctrserve.service.app import ENDPOINTS, create_app
from ctrserve.service.deployments import VERSION_KEY, deploy, promote
from ctrserve.service.drainer_metrics import DrainerMetrics
from ctrserve.service.metrics import Metrics
from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded
from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ctrserve.json"
OPERATIONS = REPO / "docs" / "operations.md"
RULE_FILES = ("recording_rules.yml", "alert_rules.yml")

# Series Prometheus makes itself for every target; neither the scorer nor the drainer
# exports them.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus attaches to every scraped sample (job and instance from the target).
TARGET_LABELS = {"job", "instance"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


# ---- promtool ------------------------------------------------------------------------------

def _promtool(*args: str, cwd: Path = REPO) -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus; "
                    ".ci/run installs it when it can)")
    done = subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "SUCCESS" in out
    return out


def test_promtool_check_config() -> None:
    """The config, and through it every rule file it loads, as Prometheus would read them."""
    out = _promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert f"{len(RULE_FILES)} rule files found" in out


def test_promtool_check_alert_rules() -> None:
    _promtool("check", "rules", "alert_rules.yml", cwd=PROM)


def test_promtool_alert_unit_tests() -> None:
    _promtool("test", "rules", "alert_rules_test.yml", cwd=PROM)


# ---- the files themselves ------------------------------------------------------------------

def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _rules(*docs: dict) -> list[dict]:
    return [rule for doc in docs for group in doc["groups"] or [] for rule in group["rules"]]


def _all_rules() -> list[dict]:
    return _rules(*(_yaml(PROM / name) for name in RULE_FILES))


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules(_yaml(PROM / "alert_rules.yml")) if "alert" in r}


def test_prometheus_scrapes_every_scorer_and_the_drainer_and_loads_the_rules() -> None:
    config = _yaml(PROM / "prometheus.yml")
    assert config["rule_files"] == list(RULE_FILES)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    scorer = jobs["ctrserve"]
    assert scorer["metrics_path"] == "/metrics"
    (sd,) = scorer["dns_sd_configs"]  # DNS discovery: a scaled compose service needs no edit
    assert (sd["names"], sd["type"], sd["port"]) == (["scorer"], "A", 8000)
    # the alerts on `up` select the job by this name
    assert 'job="ctrserve"' in _alerts()["CtrserveScorerDown"]["expr"]
    # the drainer under its compose service name, on the port its command line gives
    drainer = jobs["ctrserve-drainer"]
    (sd,) = drainer["dns_sd_configs"]
    assert (sd["names"], sd["type"], sd["port"]) == (["drainer"], "A", 9108)


def test_the_required_alerts_exist() -> None:
    alerts = _alerts()
    assert set(alerts) >= {"CtrserveHighErrorRate", "CtrserveHighLatencyP99",
                           "CtrserveQueueSaturated", "CtrserveSampleRatioMismatch",
                           "CtrserveNoEvents", "CtrserveArmLatencyP99", "CtrserveArmErrorShare",
                           "CtrserveArmCalibration"}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases: dict[str, set[bool]] = {}
    for test in _yaml(PROM / "alert_rules_test.yml")["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    for name in _alerts():
        assert cases.get(name) == {True, False}, f"{name}: needs a firing and a quiet case"


def test_recorded_names_are_unique_and_follow_the_convention() -> None:
    """level:metric:operations; a series recorded twice would be two different definitions."""
    seen: set[str] = set()
    for rule in _rules(*(_yaml(PROM / n) for n in ("recording_rules.yml", "alert_rules.yml"))):
        if "record" in rule:
            level, metric, operations = rule["record"].split(":")
            assert level and metric.startswith("ctrserve_") and operations, rule["record"]
            assert rule["record"] not in seen, f"{rule['record']} is recorded twice"
            seen.add(rule["record"])


# ---- the sample-ratio check's chi-square critical values -----------------------------------

CRITICAL = "experiment:ctrserve_users:srm_chi2_critical_p001"
DF = "experiment:ctrserve_users:srm_df_1d"
TABLE_ENTRY = re.compile(rf"\(?{DF} == (\d+)\) \* 0 \+ ([0-9.]+)")
WILSON_HILFERTY = re.compile(
    rf"\({DF} >= (\d+)\) \* \(1 - 2 / \(9 \* {DF}\) \+ ([0-9.]+) \* "
    rf"sqrt\(2 / \(9 \* {DF}\)\)\) \^ 3")
SRM_ALPHA = 0.001
WH_TOLERANCE = 0.006  # Wilson-Hilferty's relative excess at df 10, falling with df


def critical_value_rule() -> tuple[dict[int, float], int, float]:
    """The recorded critical value's table {df: value}, and the df from which Wilson-Hilferty
    takes over with its normal quantile z: the rule's `or` clauses, each parsed whole (a
    clause of another shape fails)."""
    expr = " ".join(_recorded()[CRITICAL].split())
    table: dict[int, float] = {}
    formula = None
    for clause in (c.strip() for c in expr.split(" or ")):
        if entry := TABLE_ENTRY.fullmatch(clause):
            df = int(entry.group(1))
            assert df not in table, f"df {df} twice in the table"
            table[df] = float(entry.group(2))
        elif match := WILSON_HILFERTY.fullmatch(clause):
            assert formula is None, "two formula clauses"
            formula = int(match.group(1)), float(match.group(2))
        else:
            raise AssertionError(f"unexpected clause in {CRITICAL}: {clause!r}")
    assert formula is not None, "no Wilson-Hilferty clause: experiments past the table never alert"
    return table, *formula


def wilson_hilferty(df: int, z: float) -> float:
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_every_critical_value_is_scipys_and_the_formula_takes_over_after_the_table() -> None:
    table, first_df, z = critical_value_rule()
    assert sorted(table) == list(range(1, first_df)), "the table must cover df 1 up to the formula"
    for df, value in table.items():  # scipy's quantile, rounded up at the fourth decimal
        assert value == math.ceil(chi2.isf(SRM_ALPHA, df) * 1e4) / 1e4, f"df {df}: {value}"
    assert z == round(float(norm.isf(SRM_ALPHA)), 6)
    for df in range(first_df, 2001):
        exact, approx = float(chi2.isf(SRM_ALPHA, df)), wilson_hilferty(df, z)
        # at or above the exact value (never alerts at p >= 0.001), and close to it
        assert exact <= approx <= exact * (1 + WH_TOLERANCE), f"df {df}: {approx} vs {exact}"
        assert 0.9 * SRM_ALPHA < chi2.sf(approx, df) <= SRM_ALPHA, df


def test_promtool_computes_the_critical_value_of_any_number_of_arms(tmp_path) -> None:
    """Experiments of 2 to 61 arms, and of 101 and 201, through the real rules: each one's
    recorded critical value lies within the table's rounding or Wilson-Hilferty's tolerance
    above scipy.stats.chi2.isf(0.001, arms - 1). promtool refuses a query that loads more than
    10,000 samples, so the experiments are spread over test groups of at most 600 arms."""
    groups: list[list[int]] = [[]]
    for k in [*range(2, 62), 101, 201]:
        if sum(groups[-1]) + k > 600:
            groups.append([])
        groups[-1].append(k)
    test = {"rule_files": [str(PROM / name) for name in RULE_FILES],
            "evaluation_interval": "1m",
            "tests": [_critical_value_group(arm_counts) for arm_counts in groups]}
    (tmp_path / "critical_test.yml").write_text(yaml.safe_dump(test))
    _promtool("test", "rules", "critical_test.yml", cwd=tmp_path)


def _critical_value_group(arm_counts: list[int]) -> dict:
    """A promtool test of experiments `k<arms>`, equal users and weights, with each one's
    critical value checked against scipy at minute 10."""
    series, checks = [], []
    for k in arm_counts:
        for i in range(k):
            labels = f'experiment="k{k}",arm="a{i}",instance="s1:8000",job="ctrserve"'
            control = f'control="{str(i == 0).lower()}"'
            series += [{"series": f"ctrserve_users_total{{{labels}}}", "values": "0+5x2"},
                       {"series": f"ctrserve_arm_weight{{{labels},{control}}}",
                        "values": "0.5x2"}]
        exact = float(chi2.isf(SRM_ALPHA, k - 1))
        high = exact + 1e-4 if k <= 10 else exact * (1 + WH_TOLERANCE)
        value = f'{CRITICAL}{{experiment="k{k}"}}'
        checks.append({"expr": f"({value} >= bool {exact!r}) * ({value} <= bool {high!r})",
                       "eval_time": "10m",
                       "exp_samples": [{"labels": f'{{experiment="k{k}"}}', "value": 1}]})
    return {"name": f"critical values, {arm_counts[0]} to {arm_counts[-1]} arms",
            "interval": "5m", "input_series": series, "promql_expr_test": checks}


# ---- PromQL metric names -------------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "atan2"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Grafana's template variable query: label_values(metric, label) names a metric and a label
LABEL_VALUES = re.compile(r"\blabel_values\(\s*([^,)]+?)\s*(?:,[^)]*)?\)")
IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
SELECTOR = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")


def series_names(expr: str) -> set[str]:
    """The series an expression reads: identifiers that are neither a function or aggregation
    call, a keyword, nor a label (in matchers, by/on/... lists, label_values' second argument)."""
    expr = LABEL_VALUES.sub(r"\1", expr)
    expr = re.sub(r"\{[^}]*\}", " ", STRING.sub('""', expr))  # label matchers
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables ($__rate_interval)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery windows
    expr = LABEL_LIST.sub(" ", expr)
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    return {m.group(1) for m in IDENT.finditer(expr)
            if not m.group(2) and m.group(1) not in KEYWORDS}


def test_series_name_parser() -> None:
    expr = ('sum by (le, endpoint) (rate(ctrserve_request_duration_seconds_bucket'
            '{endpoint=~"/v1/score|x"}[$__rate_interval])) / on (experiment) group_left () '
            '(experiment_arm:ctrserve_ctr:ratio_1d > bool 1e3) or vector(0) unless '
            'absent(up{job="ctrserve"} offset 5m) and histogram_quantile(0.99, x_bucket)')
    assert series_names(expr) == {"ctrserve_request_duration_seconds_bucket", "up", "x_bucket",
                                  "experiment_arm:ctrserve_ctr:ratio_1d"}
    assert series_names("label_values(ctrserve_impressions_total, experiment)") == {
        "ctrserve_impressions_total"}


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(f"panel {p['title']!r}", t["expr"]) for p in _panels(dashboard)
             for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var["query"]
        exprs.append((f"variable {var['name']}", query["query"] if isinstance(query, dict)
                      else query))
    return exprs


def _panels(dashboard: dict) -> list[dict]:
    return [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]


def _rule_exprs() -> list[tuple[str, str]]:
    return [(rule.get("record") or rule["alert"], rule["expr"]) for rule in _all_rules()]


def _exported(metrics_text: str) -> set[str]:
    names = set(PROMETHEUS_SERIES)
    for family in text_string_to_metric_families(metrics_text):
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


@pytest.fixture(scope="module")
def scorer() -> tuple[str, dict[str, set[str]]]:
    """GET /metrics of a real scorer app (the ASGI app with its middleware, not started:
    every metric is registered when the app is created, before models load), and the label
    names of each exported sample name from the app's own Metrics object."""
    app = create_app(Settings())

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://scorer") as client:
            return await client.get("/metrics")

    reply = asyncio.run(get())
    assert reply.status_code == 200
    return reply.text, {"up": set(), **_labels_of(app.state.metrics)}


def _labels_of(obj: object) -> dict[str, set[str]]:
    """Sample name -> label names, from the metric objects that are attributes of `obj`."""
    labels: dict[str, set[str]] = {}
    for wrapper in vars(obj).values():
        if isinstance(wrapper, MetricWrapperBase):
            family = wrapper.describe()[0]
            for suffix in SAMPLE_SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                labels[family.name + suffix] = set(wrapper._labelnames) | extra  # no accessor
    return labels


@pytest.fixture(scope="module")
def drainer() -> tuple[str, dict[str, set[str]]]:
    """What the drainer serves on --metrics-port (the text of its registry; no port opened),
    and the label names of each exported sample name."""
    metrics = DrainerMetrics(None)
    return generate_latest(metrics.registry).decode(), _labels_of(metrics)


@pytest.fixture(scope="module")
def exporters(scorer, drainer) -> tuple[set[str], dict[str, set[str]]]:
    """Every sample name the scorer or the drainer exports, and its label names."""
    (scorer_text, scorer_labels), (drainer_text, drainer_labels) = scorer, drainer
    scorer_names, drainer_names = _exported(scorer_text), _exported(drainer_text)
    both = (scorer_names & drainer_names) - PROMETHEUS_SERIES
    assert not both, f"the scorer and the drainer export the same names: {sorted(both)}"
    assert drainer_names - PROMETHEUS_SERIES, "the drainer exports nothing: parser broken?"
    return scorer_names | drainer_names, scorer_labels | drainer_labels


def _raw_names(exprs: list[tuple[str, str]], recorded: dict[str, str]) -> dict[str, set[str]]:
    """Raw metric name -> where it is read; recorded series are followed to their rules."""
    used: dict[str, set[str]] = {}
    todo = list(exprs)
    seen: set[str] = set()
    while todo:
        where, expr = todo.pop()
        for name in series_names(expr):
            if ":" in name:
                assert name in recorded, f"{where} reads {name}, which no rule records"
                if name not in seen:
                    seen.add(name)
                    todo.append((f"{where} via {name}", recorded[name]))
            else:
                used.setdefault(name, set()).add(where)
    return used


def _recorded() -> dict[str, str]:
    recorded: dict[str, str] = {}
    for rule in _all_rules():
        if "record" in rule:
            recorded.setdefault(rule["record"], rule["expr"])
    return recorded


def test_dashboard_and_rules_read_only_what_the_scorer_and_drainer_export(exporters) -> None:
    exported, _ = exporters
    used = _raw_names(_dashboard_exprs() + _rule_exprs(), _recorded())
    unknown = {name: sorted(where)[:3] for name, where in used.items() if name not in exported}
    assert not unknown, f"PromQL reads metrics neither the scorer nor the drainer exports: " \
        f"{unknown}"
    # the parser found the metrics behind each panel family (a broken parser finds nothing)
    assert {"ctrserve_impressions_total", "ctrserve_downloads_total", "ctrserve_users_total",
            "ctrserve_request_duration_seconds_bucket", "ctrserve_batch_rows_bucket",
            "ctrserve_queue_depth_rows", "ctrserve_model_info", "ctrserve_requests_total",
            "ctrserve_events_total", "ctrserve_shed_total", "ctrserve_arm_weight",
            "ctrserve_queue_capacity_rows", "ctrserve_log_entries",
            "ctrserve_log_capacity_entries", "ctrserve_log_lag_seconds",
            "ctrserve_serve_log_dropped_total", "ctrserve_drain_dead_letters_total",
            "ctrserve_arm_request_duration_seconds_bucket",
            "ctrserve_arm_request_duration_seconds_count", "ctrserve_arm_request_errors_total",
            "ctrserve_arm_returned_items_total", "ctrserve_arm_returned_probability_total",
            "ctrserve_guardrail_threshold"} <= used.keys()


def test_label_matchers_and_groupings_name_labels_the_metrics_carry(exporters) -> None:
    """A matcher or `by` on a label the metric lacks silently selects or splits nothing."""
    _, labels = exporters
    for where, expr in _dashboard_exprs() + _rule_exprs():
        plain = STRING.sub('""', expr)
        grouping = {label.strip() for clause in re.findall(r"\bby\s*\(([^)]*)\)", plain)
                    for label in clause.split(",") if label.strip()}
        raw = {n for n in series_names(expr) if ":" not in n}
        for name in raw:
            known = labels.get(name)
            if known is None:
                continue  # unknown names fail the test above
            missing = grouping - known - TARGET_LABELS - {"le"}
            assert not missing, f"{where}: {name} has no label {sorted(missing)}"
        for name, matchers in SELECTOR.findall(expr):
            if ":" in name or name not in labels:
                continue
            for label, op, value in MATCHER.findall(matchers):
                assert label in labels[name] | TARGET_LABELS, f"{where}: {name}{{{label}}}"
                if label == "endpoint" and op in ("=", "=~"):
                    for endpoint in value.split("|"):
                        assert endpoint in ENDPOINTS, f"{where}: endpoint {endpoint!r}"


LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ANNOTATION_LABEL = re.compile(r"\$labels\.(\w+)")
# Grafana's own columns of a table of series
TABLE_FIELDS = {"Time", "Value", "__name__"}


def _labels_behind(expr: str, labels: dict[str, set[str]], recorded: dict[str, str]
                   ) -> set[str]:
    """Every label the raw metrics behind `expr` carry (recorded series followed to their
    rules), and the labels Prometheus adds to every target's samples."""
    raw = _raw_names([("", expr)], recorded)
    return set().union(TARGET_LABELS, *(labels.get(name, set()) for name in raw))


def test_legends_table_columns_and_alert_texts_name_labels_the_series_carry(exporters) -> None:
    """A legend `{{arm}}`, a table column `arm` or an alert's `$labels.arm` over series
    labelled `bundle` shows nothing: each names a label of the metrics behind it."""
    _, labels = exporters
    recorded = _recorded()
    named = 0
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        targets = panel.get("targets", [])
        behind = [_labels_behind(t["expr"], labels, recorded) for t in targets]
        for target, carried in zip(targets, behind, strict=True):
            for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
                assert label in carried, f"panel {panel['title']!r}: legend {{{{{label}}}}}"
                named += 1
        for step in panel.get("transformations", []):
            options = step.get("options", {})
            columns = {name for key in ("indexByName", "renameByName", "excludeByName")
                       for name in options.get(key, {})} - TABLE_FIELDS
            missing = columns - set().union(*behind)
            assert not missing, f"panel {panel['title']!r}: columns {sorted(missing)}"
            named += len(columns)
    for name, rule in _alerts().items():
        carried = _labels_behind(rule["expr"], labels, recorded) | set(rule.get("labels", {}))
        for text in rule["annotations"].values():
            for label in ANNOTATION_LABEL.findall(text):
                assert label in carried, f"alert {name}: $labels.{label}"
                named += 1
    assert named > 40, "the parsers found almost no label: broken?"


# Metrics per loaded bundle (label `bundle`): the batcher's and the model's
BUNDLE_METRICS = {"ctrserve_batch_rows", "ctrserve_batch_requests", "ctrserve_queue_wait_seconds",
                  "ctrserve_inference_seconds", "ctrserve_inference_cpu_seconds",
                  "ctrserve_queue_depth_rows",
                  "ctrserve_queue_capacity_rows", "ctrserve_model_info", "ctrserve_swaps"}


def _family_labels(metrics: object) -> dict[str, set[str]]:
    """Metric family name -> label names, of the metric objects that are attributes of
    `metrics`."""
    return {wrapper.describe()[0].name: set(wrapper._labelnames)  # no public accessor
            for wrapper in vars(metrics).values() if isinstance(wrapper, MetricWrapperBase)}


def test_labels_are_named_for_what_they_carry() -> None:
    """`arm` is an experiment's arm, so it never comes without `experiment`; the batcher's and
    the models' series are per loaded bundle, labelled `bundle` (a bundle can serve several
    arms, of several experiments)."""
    families = _family_labels(Metrics())
    for name, labels in families.items():
        if "arm" in labels:
            assert "experiment" in labels, f"{name}: arm without experiment"
            assert "bundle" not in labels, name
    assert {name for name, labels in families.items() if "bundle" in labels} == BUNDLE_METRICS


def test_the_operations_metrics_table_gives_every_metric_its_labels() -> None:
    """docs/operations.md lists each metric of the scorer with exactly the labels it carries."""
    families = _family_labels(Metrics())
    counters = {w.describe()[0].name for w in vars(Metrics()).values()
                if isinstance(w, MetricWrapperBase) and w.describe()[0].type == "counter"}
    exported = {f"{name}_total" if name in counters else name: labels
                for name, labels in families.items()}
    section = OPERATIONS.read_text().split("## Metrics", 1)[1]
    documented: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`ctrserve_"):
            for name in re.findall(r"`(ctrserve_\w+)`", cells[0]):
                documented[name] = set(re.findall(r"`(\w+)`", cells[1]))
    assert exported.keys() <= documented.keys(), \
        f"not in the table: {sorted(exported.keys() - documented.keys())}"
    wrong = {name: (sorted(documented[name]), sorted(labels))
             for name, labels in exported.items() if documented[name] != labels}
    assert not wrong, f"documented labels differ from the exported ones: {wrong}"


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label pairs: value} of one sample name in a /metrics text."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def test_labelled_counters_start_at_zero(scorer) -> None:
    """Every label value the code emits exists at 0 before the first increment, so rate() and
    increase() count that increment."""
    text, _ = scorer
    shed = _samples(text, "ctrserve_shed_total")
    assert shed == {(("reason", r),): 0.0 for r in ("admission", "overload", "deadline")}
    events = {dict(k)["type"] + " " + dict(k)["status"]: v
              for k, v in _samples(text, "ctrserve_events_total").items()}
    assert events == {f"{t} {s}": 0.0 for t in ("impression", "download")
                      for s in ("accepted", "duplicate", "rejected")} | {"other rejected": 0.0}


def test_arm_weights_are_replaced_without_an_empty_scrape() -> None:
    metrics = Metrics()
    metrics.set_arms({("ranker", "lr", "true"): 0.9, ("ranker", "deepfm", "false"): 0.1,
                      ("banner", "lr", "true"): 1.0})
    seen_at_removal: list[dict] = []
    remove = metrics.arm_weight.remove

    def spy(*labels: str) -> None:
        seen_at_removal.append(_samples(metrics.render().decode(), "ctrserve_arm_weight"))
        remove(*labels)

    metrics.arm_weight.remove = spy  # type: ignore[method-assign]
    metrics.set_arms({("ranker", "lr", "false"): 0.5, ("ranker", "deepfm", "true"): 0.5})
    after = _samples(metrics.render().decode(), "ctrserve_arm_weight")
    key = (("arm", "deepfm"), ("control", "true"), ("experiment", "ranker"))
    assert len(seen_at_removal) == 3 and all(s[key] == 0.5 for s in seen_at_removal)
    assert after == {(("arm", "lr"), ("control", "false"), ("experiment", "ranker")): 0.5,
                     key: 0.5}
    # the A/B counters of every arm ever served exist (at 0 until counted)
    users = _samples(metrics.render().decode(), "ctrserve_users_total")
    assert {(dict(k)["experiment"], dict(k)["arm"]) for k in users} == {
        ("ranker", "lr"), ("ranker", "deepfm"), ("banner", "lr")}


GUARDRAIL_SERIES = ("ctrserve_arm_request_duration_seconds_bucket",
                    "ctrserve_arm_request_duration_seconds_count",
                    "ctrserve_arm_request_errors_total", "ctrserve_arm_returned_items_total",
                    "ctrserve_arm_returned_probability_total")


def test_guardrail_series_are_bounded_and_thresholds_follow_the_served_configs() -> None:
    """Per-arm guardrail series carry experiment and arm only (bounded as the config is); the
    thresholds of experiments no longer served go, as their weights do."""
    metrics = Metrics()
    labels = _labels_of(metrics)
    for name in GUARDRAIL_SERIES:
        assert labels[name] - {"le"} == {"experiment", "arm"}, name
    assert labels["ctrserve_guardrail_threshold"] == {"experiment", "guardrail"}
    metrics.set_arms({("ranker", "lr", "true"): 0.5, ("ranker", "deepfm", "false"): 0.5})
    counted = _samples(metrics.render().decode(), "ctrserve_arm_request_errors_total")
    assert counted == {(("arm", a), ("experiment", "ranker")): 0.0 for a in ("lr", "deepfm")}
    values = {"latency_p99_seconds": 0.25, "error_share": 0.01, "calibration_min": 0.8,
              "calibration_max": 1.25}
    metrics.set_guardrails({"ranker": values, "old": {**values, "error_share": 0.05}})
    metrics.set_guardrails({"ranker": {**values, "latency_p99_seconds": 0.1}})
    exported = _samples(metrics.render().decode(), "ctrserve_guardrail_threshold")
    assert exported == {(("experiment", "ranker"), ("guardrail", g)): v for g, v in
                        {**values, "latency_p99_seconds": 0.1}.items()}


# ---- Grafana -------------------------------------------------------------------------------

def test_grafana_provisioning() -> None:
    (source,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus", "prometheus", "http://prometheus:9090")
    (provider,) = _yaml(GRAFANA / "provisioning" / "dashboards" / "ctrserve.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

    dashboard = json.loads(DASHBOARD.read_text())
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == source["uid"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for needed in ("ctr per arm", "cvr (downloads per user) per arm", "uplift over control",
                   "traffic per arm",
                   "latency quantiles", "batch size", "queue depth", "model versions"):
        assert needed in titles, needed
    exprs = " ".join(expr for _, expr in _dashboard_exprs())
    assert "ctrserve_model_info" in exprs and "ctrserve_ctr:uplift_1d" in exprs


# ---- what the labels carry, on a live scorer -----------------------------------------------

API_KEY = "test-key"
CAPACITY = 1024
BODY = {"user_id": "u1", "candidates": [{"item_id": f"a{i:04d}"} for i in range(1, 4)]}


@pytest.fixture
def single_arm(bundles, tmp_path) -> Iterator[dict]:
    """A scorer without an experiments file: its one arm `control` serves LR from a registry
    of LR, DeepFM, FM and a DeepFM copy that fails verification; its own embedded Redis."""
    registry = copy_registry(bundles, tmp_path / "registry", ("lr", "deepfm", "fm"),
                             broken=True)
    store = start_embedded(tmp_path / "store.rdb")
    try:
        settings = Settings(registry=registry, bundle=bundles["lr"].name,
                            redis_url=embedded_url(store), admin_api_key=API_KEY,
                            deploy_poll_s=0.1, max_candidates=50, queue_capacity_rows=CAPACITY,
                            warmup_rounds=1)
        with LiveServer(settings) as server:
            yield {"url": server.url, "registry": registry, "redis": store,
                   "names": {m: bundles[m].name for m in ("lr", "deepfm", "fm")}}
    finally:
        stop_embedded(store)


def _scrape(url: str) -> str:
    return httpx.get(url + "/metrics").text


def _by_bundle(text: str, name: str) -> dict[str, float]:
    """{bundle: value} of a sample labelled by `bundle` only (any other label fails)."""
    out = {}
    for labels, value in _samples(text, name).items():
        assert [k for k, _ in labels] == ["bundle"], (name, labels)
        out[labels[0][1]] = value
    return out


def _model_info(text: str) -> dict[str, str]:
    """{bundle: version} of the ctrserve_model_info series, each at 1."""
    info = {}
    for labels, value in _samples(text, "ctrserve_model_info").items():
        found = dict(labels)
        assert set(found) == {"bundle", "version", "model_type", "providers"} and value == 1
        info[found["bundle"]] = found["version"]
    return info


def _swaps(text: str) -> dict[tuple[str, str], float]:
    return {(dict(k)["bundle"], dict(k)["result"]): v
            for k, v in _samples(text, "ctrserve_swaps_total").items()}


def _versions(registry: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "manifest.json").read_text())["version"]
            for p in registry.iterdir()}


def _score(url: str) -> None:
    reply = httpx.post(url + "/v1/score", json=BODY, timeout=30)
    assert reply.status_code == 200, reply.text


def test_batch_queue_and_model_series_carry_the_served_bundles_name(single_arm) -> None:
    """Without an experiments file the model is kept under the arm's name (`control`), but its
    series carry its bundle's name; a swap moves the queue gauges and the info to the new
    bundle, and a refused bundle is counted under its own name."""
    url, names = single_arm["url"], single_arm["names"]
    lr, deepfm = names["lr"], names["deepfm"]
    versions = _versions(single_arm["registry"])
    _score(url)
    text = _scrape(url)
    for name in ("ctrserve_batch_rows_count", "ctrserve_batch_requests_sum",
                 "ctrserve_queue_wait_seconds_count", "ctrserve_inference_seconds_count"):
        assert _by_bundle(text, name) == {lr: 1}, name
    assert _by_bundle(text, "ctrserve_batch_rows_sum") == {lr: len(BODY["candidates"])}
    assert _by_bundle(text, "ctrserve_queue_depth_rows") == {lr: 0}
    assert _by_bundle(text, "ctrserve_queue_capacity_rows") == {lr: CAPACITY}
    assert _model_info(text) == {lr: versions[lr]}
    assert _swaps(text) == {(lr, "loaded"): 1, (lr, "refused"): 0}

    admin = {"X-API-Key": API_KEY}
    swapped = httpx.post(url + "/admin/swap", json={"bundle": deepfm}, headers=admin, timeout=60)
    assert swapped.status_code == 200, swapped.text
    _score(url)
    text = _scrape(url)
    assert _by_bundle(text, "ctrserve_batch_rows_count") == {lr: 1, deepfm: 1}
    assert _by_bundle(text, "ctrserve_queue_depth_rows") == {deepfm: 0}
    assert _by_bundle(text, "ctrserve_queue_capacity_rows") == {deepfm: CAPACITY}
    assert _model_info(text) == {deepfm: versions[deepfm]}

    refused = httpx.post(url + "/admin/swap", json={"bundle": "deepfm-broken"}, headers=admin,
                         timeout=60)
    assert refused.status_code == 422, refused.text
    text = _scrape(url)
    assert _swaps(text) == {(lr, "loaded"): 1, (lr, "refused"): 0, (deepfm, "loaded"): 1,
                            (deepfm, "refused"): 0, ("deepfm-broken", "loaded"): 0,
                            ("deepfm-broken", "refused"): 1}
    assert _model_info(text) == {deepfm: versions[deepfm]}


def _applied(single: dict, timeout_s: float = 30) -> None:
    """Until the scorer has applied the deployment state's current version."""
    target = int(single["redis"].get(VERSION_KEY) or 0)
    wait_until(lambda: httpx.get(single["url"] + "/v1/models").json()["deployment"]["version"]
               >= target, f"deployment version {target} applied", timeout_s)


def test_a_promoted_canary_keeps_its_bundles_series(single_arm) -> None:
    """Promoting a canary without an experiments file loads its bundle under the arm's name
    before the canary's own model is unloaded: one bundle, two models for a moment. Unloading
    the canary's must leave the series of the bundle, which the arm now serves."""
    url, names, client = single_arm["url"], single_arm["names"], single_arm["redis"]
    lr, fm = names["lr"], names["fm"]
    versions = _versions(single_arm["registry"])
    deploy(client, "default", "control", fm, "test", "canary", registry=single_arm["registry"],
           canary=0.5)
    _applied(single_arm)
    text = _scrape(url)
    assert _model_info(text) == {lr: versions[lr], fm: versions[fm]}
    assert _by_bundle(text, "ctrserve_queue_capacity_rows") == {lr: CAPACITY, fm: CAPACITY}

    promote(client, "default", "control", "test", "promote", registry=single_arm["registry"])
    _applied(single_arm)
    models = httpx.get(url + "/v1/models").json()["models"]
    assert [(m["arm"], m["version"]) for m in models] == [("control", versions[fm])]
    text = _scrape(url)
    assert _model_info(text) == {fm: versions[fm]}
    assert _by_bundle(text, "ctrserve_queue_capacity_rows") == {fm: CAPACITY}
    assert _by_bundle(text, "ctrserve_queue_depth_rows") == {fm: 0}
    assert _swaps(text) == {(lr, "loaded"): 1, (lr, "refused"): 0, (fm, "loaded"): 2,
                            (fm, "refused"): 0}
    _score(url)
    assert _by_bundle(_scrape(url), "ctrserve_batch_rows_count") == {lr: 0, fm: 1}
