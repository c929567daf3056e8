"""`ctrserve serve --workers 2`: two processes on one port, metrics exact across them, admin
changes followed by both.

A real scorer subprocess (port 0: the parent binds a free port and logs it) on a real
redis-server. Requests on fresh connections spread over both workers; every counter of
/metrics (prometheus_client's multiprocess mode) equals what the client sent, whichever
worker answers the scrape. A swap or a new experiments config taken by one worker reaches the
other through the deployment state in Redis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctrserve.loadtest.redis_servers import LocalRedis
from ctrserve.service.settings import default_workers, quota_cores
from tests.serving import copy_registry, metric_value
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
ITEMS = [f"a{i:04d}" for i in range(1, 9)]
ADMIN_KEY = "k" * 16


@pytest.fixture
def scorer(bundles, redis_binaries, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry")
    lr = bundles["lr"].name
    with LocalRedis(tmp_path / "redis") as redis_server:
        env = {**os.environ, "REDIS_URL": redis_server.url, "CTRSERVE_ADMIN_API_KEY": ADMIN_KEY,
               "CTRSERVE_DEPLOY_POLL_S": "0.2"}
        cmd = [sys.executable, "-m", "ctrserve", "serve", "--registry", str(registry),
               "--bundle", lr, "--port", "0", "--workers", "2", "--log-level", "info"]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            url = listening(proc)
            wait_ready(url, proc)
            yield url, proc, lr
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def listening(proc: subprocess.Popen) -> str:
    for line in proc.stderr:
        found = re.search(r"running on (http://\S+) with", line)
        if found:
            return found.group(1)
    raise RuntimeError(f"the scorer exited with {proc.wait()} before listening")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until two consecutive fresh connections (either worker) answer /readyz 200."""
    deadline, ready = time.monotonic() + timeout_s, 0
    while ready < 4:
        assert proc.poll() is None and time.monotonic() < deadline, "workers not ready"
        try:
            ok = httpx.get(url + "/readyz", headers={"Connection": "close"}).status_code == 200
        except httpx.HTTPError:
            ok = False
        ready = ready + 1 if ok else 0
        time.sleep(0.05)


def test_two_workers_share_the_port_and_count_exactly(scorer):
    url, proc, lr = scorer
    workers = psutil.Process(proc.pid).children()  # the two workers (and spawn's tracker)
    assert len([w for w in workers if "ctrserve" in " ".join(w.cmdline()) or
                "spawn_main" in " ".join(w.cmdline())]) >= 2
    shown = 0
    for n in range(40):
        with httpx.Client(base_url=url, headers={"Connection": "close"}) as client:
            reply = client.post("/v1/score", json={
                "user_id": f"u{n:05d}", "candidates": [{"item_id": i} for i in ITEMS]}).json()
            items = reply["item_ids"][: 1 + n % 3]
            out = client.post("/v1/events", json={"events": [{
                "event_id": f"w-{n}", "type": "impression", "attribution": reply["attribution"],
                "user_id": f"u{n:05d}", "ts": time.time(),
                "items": [{"item_id": i, "position": p} for p, i in enumerate(items, 1)]}]})
            assert out.json()["accepted"] == 1
            shown += len(items)
    for _ in range(4):  # any worker's scrape reports the sum over both
        text = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
        assert metric_value(text, 'ctrserve_requests_total{endpoint="/v1/score",'
                                  'status="200"}') == 40
        assert metric_value(text, 'ctrserve_impressions_total{arm="control",'
                                  'experiment="default"}') == shown
        assert metric_value(text, 'ctrserve_users_total{arm="control",'
                                  'experiment="default"}') == 40
        assert metric_value(text, "ctrserve_request_duration_seconds_count") >= 80
        # each score request ran in one batch of a worker, labelled by the bundle it served
        assert metric_value(text, f'ctrserve_batch_requests_sum{{bundle="{lr}"}}') == 40
        info = [(s.labels["bundle"], s.value) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "ctrserve_model_info"]
        assert info == [(lr, 1)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive


def series(url: str, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """{these labels' values: value} of a gauge's non-zero series, from a scrape: with
    livemax, a series that a worker still holds shows even where another dropped it to 0."""
    text = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
    return {tuple(s.labels[k] for k in labels): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name and s.value}


def test_admin_changes_reach_every_worker(scorer, bundles):
    url, proc, lr = scorer
    deepfm, admin = bundles["deepfm"].name, {"X-API-Key": ADMIN_KEY}
    swap = httpx.post(url + "/admin/swap", json={"bundle": deepfm}, headers=admin, timeout=60)
    assert swap.status_code == 200, swap.text
    # each worker's info series: the swapped-out bundle shows 1 while any worker serves it
    wait_until(lambda: series(url, "ctrserve_model_info", "bundle") == {(deepfm,): 1},
               "both workers serve the swapped bundle", timeout_s=60)
    config = {"experiments": [{"name": "ranker", "salt": "r1", "arms": [
        {"name": "lr", "weight": 0.5, "bundle": lr, "control": True},
        {"name": "deepfm", "weight": 0.5, "bundle": deepfm}]}]}
    put = httpx.put(url + "/admin/experiments", json=config, headers=admin, timeout=60)
    assert put.status_code == 200, put.text
    wait_until(lambda: series(url, "ctrserve_arm_weight", "experiment", "arm") ==
               {("ranker", "lr"): 0.5, ("ranker", "deepfm"): 0.5},
               "both workers route by the new config", timeout_s=60)
    arms = set()
    for n in range(20):  # fresh connections, either worker: the new config's arms
        reply = httpx.post(url + "/v1/score", headers={"Connection": "close"}, json={
            "user_id": f"x{n}", "candidates": [{"item_id": "a0001"}]}).json()
        assert reply["experiment"] == "ranker"
        arms.add(reply["arm"])
    assert arms == {"lr", "deepfm"}
    workers = psutil.Process(proc.pid).children()
    proc.kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive  # a killed scorer takes its workers with it: none keeps its port


WHERE = ("from ctrserve.service.settings import Settings; "
         "print(Settings().inference_on_thread, Settings(workers=2).inference_on_thread)")


def where_inference_runs(cores: set[int]) -> list[str]:
    """Settings' default, in a process allowed only `cores` (as `taskset` or a cpuset does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTRSERVE_")}
    out = subprocess.run([sys.executable, "-c", WHERE], env=env, capture_output=True, text=True,
                         check=True, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    return out.stdout.split()


def test_inference_runs_on_the_loop_unless_one_worker_has_a_second_core():
    cores = os.sched_getaffinity(0)
    assert where_inference_runs({min(cores)}) == ["False", "False"]  # nothing to overlap with
    if len(cores) > 1:
        assert where_inference_runs(cores) == ["True", "False"]


@pytest.mark.parametrize(("files", "cores"), [
    ({"cpu.max": "150000 100000\n"}, 1.5), ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None), ({}, None)])
def test_a_cgroup_cpu_quota_is_read_in_cores(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert quota_cores(tmp_path) == cores


def test_serve_defaults_to_one_worker_per_usable_core():
    cores = os.sched_getaffinity(0)
    if quota_cores() is None:
        assert default_workers() == len(cores)
    code = "from ctrserve.service.settings import default_workers; print(default_workers())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {min(cores)}))
    assert out.stdout.strip() == "1"  # taskset to one core: one worker
