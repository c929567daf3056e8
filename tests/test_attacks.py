"""Defects found by attacking the running service (issue 16), each pinned through the public
interfaces: the admin API over HTTP, the CLI, the bundle files."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from ctrserve.service.settings import Settings
from tests.serving import LiveServer, copy_registry

REPO = Path(__file__).resolve().parents[1]
API_KEY = "attack-key"
HEADERS = {"X-API-Key": API_KEY}


def arms(registry: Path) -> dict:
    names = {p.name.split("-")[0]: p.name for p in registry.iterdir()}
    return {"experiments": [{"name": "ranker", "salt": "ranker-1", "arms": [
        {"name": "control", "weight": 0.5, "bundle": names["lr"], "control": True},
        {"name": "treatment", "weight": 0.5, "bundle": names["deepfm"]}]}]}


@pytest.fixture
def scorer(bundles, synth_dir, redis_server_url, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry")
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(arms(registry)))
    settings = Settings(registry=registry, experiments_file=tmp_path / "experiments.yaml",
                        redis_url=redis_server_url, admin_api_key=API_KEY,
                        max_candidates=50, queue_capacity_rows=1024, warmup_rounds=1,
                        load_features=synth_dir, max_body_bytes=1 << 20)
    with LiveServer(settings) as live:
        live.registry = registry
        yield live


def listed(url: str) -> dict[str, tuple[str, str]]:
    experiment = httpx.get(url + "/v1/experiments").json()["experiments"][0]
    return {a["name"]: (a["bundle"], a["model_version"]) for a in experiment["arms"]}


def test_a_swap_changes_what_is_listed_with_what_is_served(scorer):
    before = listed(scorer.url)
    lr_bundle = before["control"][0]
    # a model key (the bundle name) is not an arm: refused, naming the arms
    wrong = httpx.post(scorer.url + "/admin/swap", headers=HEADERS,
                       json={"arm": before["treatment"][0], "bundle": lr_bundle})
    assert wrong.status_code == 404
    assert "control" in wrong.json()["detail"][0]["msg"] and listed(scorer.url) == before
    several = httpx.post(scorer.url + "/admin/swap", headers=HEADERS, json={"bundle": lr_bundle})
    assert several.status_code == 422 and several.json()["detail"][0]["loc"] == ["body", "arm"]

    reply = httpx.post(scorer.url + "/admin/swap", headers=HEADERS, timeout=60,
                       json={"arm": "treatment", "bundle": lr_bundle})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["from_version"], reply.json()["to_version"]) == (
        before["treatment"][1], before["control"][1])
    assert listed(scorer.url)["treatment"] == before["control"]
    served = {m["version"] for m in httpx.get(scorer.url + "/v1/models").json()["models"]}
    assert served == {before["control"][1]}  # the deepfm model is unloaded: no arm names it


def test_an_admin_body_over_the_limit_is_413_before_it_is_read(scorer):
    huge = b'{"bundle": "' + b"x" * (2 << 20) + b'"}'
    for path in ("/admin/swap", "/admin/experiments"):
        reply = httpx.request("POST" if path == "/admin/swap" else "PUT", scorer.url + path,
                              headers=HEADERS, content=huge)
        assert reply.status_code == 413, (path, reply.text)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_deeply_nested_experiments_are_a_422_not_a_500(scorer, fmt):
    text = "[" * 50_000 + "]" * 50_000
    reply = httpx.put(scorer.url + "/admin/experiments", content=text,
                      headers={**HEADERS, "content-type": f"application/{fmt}"})
    assert reply.status_code == 422, reply.text
    assert "nested too deeply" in reply.json()["detail"][0]["msg"]
    assert httpx.get(scorer.url + "/readyz").status_code == 200


def tampered(bundles: dict, dest: Path) -> Path:
    """A DeepFM copy whose weights changed and whose recorded hash was recomputed to match."""
    bundle = dest / bundles["deepfm"].name
    shutil.copytree(bundles["deepfm"], bundle)
    model = bytearray((bundle / "model.onnx").read_bytes())
    model[-64:-32] = bytes(32)  # inside the last initializer's raw data
    (bundle / "model.onnx").write_bytes(bytes(model))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(model).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_a_bundle_altered_with_its_hash_is_not_served_under_the_genuine_version(bundles,
                                                                               tmp_path):
    bundle = tampered(bundles, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ctrserve", "verify", str(bundle)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "version" in proc.stderr and "modified" in proc.stderr


def test_deploy_refuses_a_registry_link_that_leads_outside(bundles, tmp_path):
    registry = copy_registry(bundles, tmp_path / "registry")
    outside = tmp_path / "elsewhere"
    shutil.copytree(bundles["deepfm"], outside)
    (registry / "deepfm-link").symlink_to(outside, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "ctrserve", "deploy", "--registry",
                           str(registry), "--experiment", "ranker", "--arm", "main", "--bundle",
                           "deepfm-link"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "outside" in proc.stderr and bundles["lr"].name in proc.stderr  # lists the bundles
