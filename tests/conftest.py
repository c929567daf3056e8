"""Shared fixtures: a small synthetic world and models trained on it through the CLI, and real
Debian redis-servers (a cluster, a standalone server)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrserve.cli import main
from ctrserve.loadtest.redis_servers import MISSING, LocalCluster, LocalRedis, redis_binary

REPO = Path(__file__).resolve().parents[1]
# CTRSERVE_STRICT_TESTS=1 (set by .ci/run): every skip is a failure. Tests skip where a tool or
# a dataset they need is absent (promtool, chromium, compose, systemd-analyze, the peers'
# environment, ../shared/datasets); CI installs them all, so a skip there means it did not.
STRICT = os.environ.get("CTRSERVE_STRICT_TESTS") == "1"
SMALL_MODEL_FLAGS = ["--mlp", "32,16", "--embedding-dim", "8", "--apg-rank", "4",
                     "--apg-overparam", "8", "--batch-size", "256", "--no-progress"]


def shared_datasets() -> Path | None:
    """The real click logs: $CTR_DATA_DIR, else ../shared/datasets beside the checkout."""
    env = os.environ.get("CTR_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "datasets"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    assert main(["synth", "--out", str(out), "--days", "4", "--impressions-per-day", "6000",
                 "--users", "400", "--apps", "120", "--seed", "7", "--no-progress"]) == 0
    return out


def train_cli(synth_dir: Path, out: Path, model: str, *extra: str) -> int:
    return main(["train", "--model", model, "--data", f"synth:{synth_dir}", "--out", str(out),
                 "--epochs", "2", *SMALL_MODEL_FLAGS, *extra])


@pytest.fixture(scope="session")
def trained_runs(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for model in ("lr", "fm", "deepfm", "apg-deepfm"):
        out = tmp_path_factory.mktemp(f"run-{model}")
        assert train_cli(synth_dir, out, model) == 0
        runs[model] = out
    return runs


@pytest.fixture(scope="session")
def bundles(trained_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    registry = tmp_path_factory.mktemp("registry")
    out = {}
    for model, run in trained_runs.items():
        assert main(["export", str(run), "--registry", str(registry)]) == 0
        out[model] = next(p for p in registry.iterdir()
                          if json.loads((p / "manifest.json").read_text())["model_type"] == model)
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CTRSERVE_STRICT_TESTS=1, where skips fail: {reason}"


# Real Redis from Debian's redis-server (a 3-master cluster, or one standalone server) on free
# random ports: skipped with a reason where the binaries are missing, an error under CI.
@pytest.fixture(scope="session")
def redis_binaries() -> None:
    """Debian's redis-server and redis-cli are on PATH (else skip; under CI, go on and fail)."""
    if (redis_binary("redis-server") is None or redis_binary("redis-cli") is None) \
            and not os.environ.get("CI"):
        pytest.skip(MISSING)


@pytest.fixture(scope="session")
def redis_cluster(redis_binaries: None, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def redis_server_url(redis_binaries: None, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[str]:
    """A standalone redis-server of the test module's own (a start costs ~20 ms)."""
    with LocalRedis(tmp_path_factory.mktemp("redis-server")) as server:
        yield server.url


@pytest.fixture
def own_redis_url(redis_binaries: None, tmp_path: Path) -> Iterator[str]:
    """A redis-server of the test's own, for tests that touch every key (a drain moves every
    stream it finds)."""
    with LocalRedis(tmp_path / "redis") as server:
        yield server.url
