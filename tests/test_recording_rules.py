"""Prometheus recording rules (deploy/prometheus/): valid, unit-tested, and built only on
metric names the scorer or the log drainer (`ctrserve drain-events --follow --metrics-port`)
really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ctrserve.service.drainer_metrics import DrainerMetrics
from ctrserve.service.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "recording_rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "recording_rules_test.yml"

# The A/B counters of issue 4, labelled {experiment, arm}: the rules must read them (they are
# checked against what service/metrics.py registers like every other metric, never assumed).
AB_COUNTERS = {"ctrserve_impressions_total", "ctrserve_downloads_total", "ctrserve_users_total"}
# The per-arm guardrail series (latency, errors, calibration), labelled {experiment, arm}.
GUARDRAIL_SERIES = {"ctrserve_arm_request_duration_seconds_bucket",
                    "ctrserve_arm_request_duration_seconds_count",
                    "ctrserve_arm_request_errors_total", "ctrserve_arm_returned_items_total",
                    "ctrserve_arm_returned_probability_total"}
# The batcher's histograms, labelled {bundle}: per loaded bundle, whichever arms it serves.
BATCHER_SERIES = {"ctrserve_batch_rows_sum", "ctrserve_batch_rows_count",
                  "ctrserve_queue_wait_seconds_bucket"}

# A series name: letters, digits, underscores and colons. Raw metrics have no colon;
# recorded series (level:metric:operations) do, and are skipped.
NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
GROUP_BY = re.compile(r"\bby\s*\(([^)]*)\)")

SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus; "
                    ".ci/run installs it when it can)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_promtool_check_rules() -> None:
    done = _run("check", "rules", str(RULES.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_unit_tests() -> None:
    done = _run("test", "rules", str(RULES_TEST.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _exported_series_names() -> set[str]:
    """Every sample name the scorer's registry can expose (families' names plus suffixes), and
    every one the drainer serves on its metrics port (the text of its registry)."""
    names: set[str] = set()
    drainer = text_string_to_metric_families(
        generate_latest(DrainerMetrics(None).registry).decode())
    for family in [*Metrics().registry.collect(), *drainer]:
        assert isinstance(family, Metric)
        base = family.name
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            names.add(base + suffix)
    return names


def _exported_label_names() -> dict[str, set[str]]:
    """Sample name -> label names (without `le`), for every metric of the scorer's Metrics and
    the drainer's DrainerMetrics."""
    labels: dict[str, set[str]] = {}
    for wrapper in [*vars(Metrics()).values(), *vars(DrainerMetrics(None)).values()]:
        if isinstance(wrapper, MetricWrapperBase):
            family = wrapper.describe()[0]
            for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
                labels[family.name + suffix] = set(wrapper._labelnames)  # no public accessor
    return labels


def _raw_metric_names(expr: str) -> set[str]:
    return {n for n in NAME.findall(expr) if n.startswith("ctrserve_") and ":" not in n}


def test_rules_use_only_exported_metrics() -> None:
    exported = _exported_series_names()
    used: dict[str, set[str]] = {}
    for rule in _rules():
        for name in _raw_metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule["record"])
    assert used, "no ctrserve_ metric found in the rules: the parser is broken"
    unknown = {name: sorted(records) for name, records in used.items() if name not in exported}
    assert not unknown, f"rules read metrics the scorer does not export: {unknown}"
    # every A/B counter, guardrail series, batcher series and the latency histogram feed at
    # least one rule
    assert used.keys() >= AB_COUNTERS | GUARDRAIL_SERIES | BATCHER_SERIES
    assert "ctrserve_request_duration_seconds_bucket" in used


def test_rules_group_by_labels_the_metrics_carry() -> None:
    """`sum by (experiment, arm)` over a metric without an `arm` label silently merges arms, and
    `sum by (arm)` over one labelled `bundle` merges bundles."""
    labels = _exported_label_names()
    for name in AB_COUNTERS | GUARDRAIL_SERIES:
        assert labels[name] == {"experiment", "arm"}, name
    for name in BATCHER_SERIES:
        assert labels[name] == {"bundle"}, name
    for rule in _rules():
        grouping = {label.strip() for clause in GROUP_BY.findall(rule["expr"])
                    for label in clause.split(",") if label.strip()} - {"le"}
        for name in _raw_metric_names(rule["expr"]):
            # a metric the scorer and the drainer no longer export carries no label at all
            assert name in labels, f"{rule['record']} reads {name}, which nothing exports"
            missing = grouping - labels[name]
            assert not missing, f"{rule['record']}: {name} has no label {sorted(missing)}"


@pytest.mark.parametrize("metric", ["ctrserve_retired_total", "ctrserve_impressions_bucket"])
def test_a_rule_on_a_metric_nothing_exports_fails_both_checks(monkeypatch, metric) -> None:
    """The two checks above catch a rule that reads a removed (or misspelt) metric."""
    rule = {"record": "experiment_arm:ctrserve_retired:rate5m",
            "expr": f"sum by (experiment, arm) (rate({metric}[5m]))"}
    rules = [*_rules(), rule]
    monkeypatch.setattr(sys.modules[__name__], "_rules", lambda: rules)
    with pytest.raises(AssertionError, match=metric):
        test_rules_use_only_exported_metrics()
    with pytest.raises(AssertionError, match=metric):
        test_rules_group_by_labels_the_metrics_carry()


def test_recorded_names_follow_the_convention() -> None:
    """level:metric:operations, each defined once, and only recorded series (colons) or raw
    ctrserve_ metrics appear in expressions: a typo in a recorded name would read nothing."""
    records = [rule["record"] for rule in _rules()]
    assert len(records) == len(set(records)), "a series is recorded twice"
    for record in records:
        level, metric, operations = record.split(":")
        assert level and metric.startswith("ctrserve_") and operations, record
        assert not metric.endswith("_total"), f"{record}: drop _total after rate/increase"
    for rule in _rules():
        for name in NAME.findall(rule["expr"]):
            if ":" in name:
                assert name in records, f"{rule['record']} reads {name}, which nothing records"


def test_metric_name_parser() -> None:
    expr = ("experiment_arm:ctrserve_ctr:ratio_1d / on (experiment) group_left () "
            "sum by (le) (rate(ctrserve_request_duration_seconds_bucket[5m]))")
    assert _raw_metric_names(expr) == {"ctrserve_request_duration_seconds_bucket"}
