"""The Dockerfile, docker-compose.yml and the scripts the containers run.

No image is built here (the tests run where no Docker engine is): the Dockerfile is parsed and
its promises checked (the serve stage never installs torch, dependencies before source), the
compose file is checked by `docker compose config` where the compose plugin exists and by its
structure everywhere, and the containers' shell scripts run for real with a stand-in
`ctrserve` on the PATH.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ctrserve.cli import build_parser, commands
from ctrserve.loadtest.simulator import check_loopback
from ctrserve.service.app import ENDPOINTS
from ctrserve.service.experiments.config import load_experiments

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
SCHEDULE = REPO / "deploy" / "schedule"
# where the Dockerfile puts the source (WORKDIR + COPY . .): compose runs scripts from there
IMAGE_SOURCE = "/opt/ctrserve/"


def _load_requirements_helper():
    """deploy/docker/requirements.py, which the Dockerfile runs: not a package, loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "docker_requirements", REPO / "deploy" / "docker" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.requirements


requirements = _load_requirements_helper()

# ---- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """(global ARG defaults, stage -> [(INSTRUCTION, arguments)], stage -> parent stage or
    image), continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in (REPO / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    parents: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), " ".join(rest.split())
        if instruction == "FROM":
            base, _, name = rest.partition(" AS ")
            current = name.strip()
            stages[current], parents[current] = [], base.strip()
        elif current is None:
            if instruction == "ARG":
                name, _, default = rest.partition("=")
                args[name] = default
        else:
            stages[current].append((instruction, rest))
    return args, stages, parents


def chain(stage: str) -> list[str]:
    """The stage and its ancestors, root first."""
    _, stages, parents = dockerfile()
    out = [stage]
    while parents[out[-1]] in stages:
        out.append(parents[out[-1]])
    return out[::-1]


def instructions(stage: str) -> list[tuple[str, str]]:
    _, stages, _ = dockerfile()
    return [step for name in chain(stage) for step in stages[name]]


def test_serve_stage_never_installs_torch() -> None:
    runs = [rest for kind, rest in instructions("serve") if kind == "RUN"]
    assert any("pip install" in run for run in runs)
    for run in runs:
        assert not re.search(r"torch|\btrain\b|\[train\]", run, re.I), run
    # and the requirements it installs (pyproject's base dependencies) have no torch either
    for ort in ("onnxruntime", "onnxruntime-gpu"):
        reqs = requirements(_pyproject(), ort=ort)
        assert not any("torch" in r for r in reqs)
        assert sum(r.startswith(ort + ">=") for r in reqs) == 1
        assert not any(r.startswith("onnxruntime>=") for r in reqs) or ort == "onnxruntime"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_requirements_helper() -> None:
    assert "torch>=2.3" in requirements(_pyproject(), extra="train")
    pinned = requirements(_pyproject(), ort="onnxruntime-gpu==1.20.1")
    assert "onnxruntime-gpu==1.20.1" in pinned and len(pinned) == len(requirements(_pyproject()))


def test_the_images_install_the_pinned_versions_of_every_dependency() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (REPO / "deploy" / "docker" / "constraints.txt").read_text().splitlines()
    pins = {canonicalize_name(n): v for n, v in (line.split("==") for line in lines
                                                 if line and not line.startswith("#"))}
    for req in map(Requirement, requirements(_pyproject())):
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(version), f"{req.name}=={version} is outside {req}"
    for target in ("serve", "trainer"):
        installs = [r for k, r in instructions(target) if k == "RUN" and "pip install -r" in r]
        assert installs and all("-c constraints.txt" in r for r in installs), target
    copied = [r for k, r in instructions("deps") if k == "COPY"]
    assert any("deploy/docker/constraints.txt" in r for r in copied)


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    for target in ("serve", "trainer"):
        steps = instructions(target)
        copy_pyproject = next(i for i, (k, r) in enumerate(steps)
                              if k == "COPY" and "pyproject.toml" in r)
        install = next(i for i, (k, r) in enumerate(steps)
                       if k == "RUN" and "pip install -r" in r)
        copy_source = next(i for i, (k, r) in enumerate(steps)
                           if k == "COPY" and r.split()[0] == ".")
        assert copy_pyproject < install < copy_source, target
        # everything pip installs from the index comes before the source
        assert all(i < copy_source for i, (k, r) in enumerate(steps)
                   if k == "RUN" and "pip install" in r and "--no-deps" not in r), target


def test_the_serve_target() -> None:
    args, _, parents = dockerfile()
    assert args["BASE"] == "python:3.11-slim" and chain("serve")[0] == "python"
    assert parents["python"] == "${BASE}"
    steps = instructions("serve")
    kinds = dict(steps)  # the last of each kind
    assert kinds["USER"] not in ("root", "0")
    assert kinds["EXPOSE"] == "8000"
    assert json.loads(kinds["CMD"]) == ["ctrserve", "serve"]
    assert "CTRSERVE_HOST=0.0.0.0" in " ".join(r for k, r in steps if k == "ENV")
    # a GPU build swaps onnxruntime through a build argument
    assert ("ARG", "ORT=onnxruntime") in steps
    assert any('--ort "$ORT"' in r for k, r in steps if k == "RUN")


def _healthcheck() -> list[str]:
    check = dict(instructions("serve"))["HEALTHCHECK"]
    return json.loads(check[check.index("CMD") + 3:])


def test_the_healthcheck_asks_readyz_without_curl() -> None:
    command = _healthcheck()
    assert command[:2] == ["python", "-c"] and "urllib" in command[2]
    path = re.search(r"/(readyz|healthz)", command[2]).group(0)
    assert path in ENDPOINTS


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_command_follows_readiness(status: int, healthy: bool) -> None:
    """The HEALTHCHECK's own command against a stand-in that answers /readyz with `status`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "CTRSERVE_PORT": str(server.server_address[1])}
        done = subprocess.run([sys.executable, *_healthcheck()[1:]], env=env,
                              capture_output=True, timeout=30, check=False)
    finally:
        server.shutdown()
    assert (done.returncode == 0) == healthy


def test_the_trainer_target_adds_cpu_torch_then_the_train_extra() -> None:
    steps = instructions("trainer")
    runs = [r for k, r in steps if k == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    extra = next(i for i, r in enumerate(runs) if "--extra train" in r)
    assert torch < extra
    index = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)["TORCH_INDEX"]
    assert index == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "$TORCH_INDEX"' in runs[torch]
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["ctrserve"]


def test_dockerignore_keeps_the_source_out_of_nothing() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", "demo", "runs", "registry", "bench-out", ".git"):
        assert needed in patterns, needed
    assert any("datasets" in p for p in patterns)
    folders = list(_pyproject()["tool"]["setuptools"]["package-dir"].values())
    kept = [*folders, "pyproject.toml", "README.md", "deploy/docker/requirements.py",
            "deploy/docker/constraints.txt", "deploy/compose/setup.sh",
            "deploy/schedule/retrain-loop.sh"]
    for path in kept:
        assert (REPO / path).exists(), path
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            assert not (fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, bare)
                        or path.startswith(bare.rstrip("/") + "/")), f"{pattern} drops {path}"


# ---- docker-compose.yml --------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _docker_compose() -> list[str]:
    """`docker compose` (the v2 plugin), else Debian's standalone `docker-compose` (v1.29,
    which `.ci/run` installs: it validates the same file format, profiles included)."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               text=True, timeout=60, check=False)
        if probe.returncode == 0:
            return ["docker", "compose", "-f", str(COMPOSE)]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose", "-f", str(COMPOSE)]
    pytest.skip("neither `docker compose` (the CLI's compose plugin) nor `docker-compose` is "
                "installed: docker-compose.yml was not validated")


@pytest.mark.parametrize("profile", [[], ["--profile", "simulate"]], ids=["default", "simulate"])
def test_docker_compose_config(profile: list[str]) -> None:
    done = subprocess.run([*_docker_compose(), *profile, "config", "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_services() -> None:
    services = _compose()["services"]
    assert set(services) >= {"redis", "setup", "scorer", "prometheus", "grafana", "retrain",
                             "simulate"}
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])

    scorer = services["scorer"]
    assert scorer["build"]["target"] == "serve"
    assert scorer["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    # scalable: no fixed name, and a port range (or no published port) on the host
    assert "container_name" not in scorer
    for port in scorer.get("ports", []):
        host = port.rsplit(":", 1)[0]
        assert "-" in host.rsplit(":", 1)[-1], f"{port}: one host port blocks --scale"
    assert scorer["depends_on"]["setup"]["condition"] == "service_completed_successfully"

    # the registry: one volume, written by setup and retrain, read by the scorers
    volume = {name: next(v for v in services[name]["volumes"] if ":/data" in v)
              for name in ("setup", "scorer", "retrain", "simulate")}
    assert {v.split(":")[0] for v in volume.values()} == {"data"}
    assert volume["scorer"].endswith(":ro")
    for name in ("setup", "retrain"):
        assert services[name]["build"]["target"] == "trainer"
        entry = services[name]["entrypoint"]
        assert entry[0] == "/bin/sh" and entry[1].startswith(IMAGE_SOURCE)
        assert (REPO / entry[1].removeprefix(IMAGE_SOURCE)).is_file()
    assert services["scorer"]["environment"]["CTRSERVE_REGISTRY"] == \
        services["retrain"]["environment"]["CTRSERVE_REGISTRY"]


def test_compose_monitoring_mounts_match_the_provisioning() -> None:
    services = _compose()["services"]
    prom = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom["/etc/prometheus"] == "./deploy/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/ctrserve.yml")
                              .read_text())["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert (REPO / dashboards / "ctrserve.json").is_file()
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # Prometheus finds the scorers under the compose service's name, on the image's port
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    sd = next(j for j in scrape["scrape_configs"] if j["job_name"] == "ctrserve")
    assert sd["dns_sd_configs"][0]["names"] == ["scorer"]


def _simulate_argv() -> list[str]:
    script = _compose()["services"]["simulate"]["command"][0].replace("$$", "$")
    line = re.search(r"ctrserve (simulate .*?)>/dev/null", script.replace("\\\n", " "),
                     re.S).group(1)
    values = {"SIMULATE_REQUESTS_PER_DAY": "3000", "SIMULATE_CONCURRENCY": "4", "seed": "1"}
    return shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line))


def test_the_simulate_profile_reaches_a_scorer_on_loopback() -> None:
    simulate = _compose()["services"]["simulate"]
    assert simulate["profiles"] == ["simulate"]
    assert simulate["network_mode"] == "service:scorer"
    args = build_parser().parse_args(_simulate_argv())
    assert args.func is commands.simulate
    check_loopback(args.url)  # accepted
    with pytest.raises(ValueError, match="loopback"):  # why the network namespace is shared
        check_loopback("http://scorer:8000")


# ---- the scripts the containers run ---------------------------------------------------------

def _loop(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCHEDULE / "retrain-loop.sh"), *args],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=30, check=False, **kwargs)


def _compose_retrain_env() -> dict[str, str]:
    return {k: str(v) for k, v in _compose()["services"]["retrain"]["environment"].items()}


def test_the_retrain_container_runs_the_scheduled_command() -> None:
    """The loop's command and the systemd unit's parse to the same retrain."""
    env = _compose_retrain_env()
    done = _loop(env, "--dry-run")
    assert done.returncode == 0, done.stderr
    loop_args = build_parser().parse_args(shlex.split(done.stdout.splitlines()[1])[1:])
    unit = (SCHEDULE / "ctrserve-retrain.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1)
    exec_start = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start)
    unit_args = build_parser().parse_args(shlex.split(exec_start)[1:])
    assert loop_args.func is commands.retrain
    assert vars(loop_args) == vars(unit_args)
    assert env["RETRAIN_AT"] == re.search(r"OnCalendar=\*-\*-\* (\d\d:\d\d)", (
        SCHEDULE / "ctrserve-retrain.timer").read_text()).group(1)


@pytest.mark.parametrize(("now", "at", "wait"), [
    ("00:29:00", "00:30", 60), ("00:30:00", "00:30", 0), ("00:30:01", "00:30", 86399),
    ("23:59:59", "00:30", 1801), ("12:00:00", "08:09", 72540)])
def test_the_retrain_loop_sleeps_until_the_next_run(now: str, at: str, wait: int) -> None:
    h, m, s = map(int, now.split(":"))
    epoch = 20_000 * 86400 + h * 3600 + m * 60 + s  # a UTC midnight plus the time of day
    done = _loop({**_compose_retrain_env(), "RETRAIN_AT": at, "RETRAIN_LOOP_NOW": str(epoch)},
                 "--dry-run")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.splitlines()[0]) == wait


def test_the_retrain_loop_refuses_a_bad_time() -> None:
    done = _loop({**_compose_retrain_env(), "RETRAIN_AT": "24:00"}, "--dry-run")
    assert done.returncode == 2 and "RETRAIN_AT" in done.stderr
    done = _loop({"CTRSERVE_EVENTS_DIR": "/data/events"}, "--dry-run")
    assert done.returncode != 0 and "CTRSERVE_EXPERIMENT" in done.stderr


def _stub(tmp_path: Path, body: str) -> Path:
    """A directory with a stand-in `ctrserve` that logs its arguments, then runs `body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "ctrserve"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\n{body}\n')
    stub.chmod(0o755)
    return bin_dir


def test_the_retrain_loop_survives_a_failure_and_stops_on_sigterm(tmp_path: Path) -> None:
    """RETRAIN_ON_START runs the command once at start; its failure is logged and the loop
    sleeps on; docker stop's SIGTERM ends the loop (PID 1 in the container) at once."""
    bin_dir = _stub(tmp_path, "exit 3")
    env = {**_compose_retrain_env(), "RETRAIN_ON_START": "1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["sh", str(SCHEDULE / "retrain-loop.sh")], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "calls").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the sleep until the next run
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 143
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert "failed (exit 3)" in stderr and "next retrain of ranker at 00:30 UTC" in stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith("retrain --experiment ranker --arm all --events /data/events")


SETUP_STUB = """
case "$1" in
  synth) mkdir -p "$3" && echo '{}' > "$3/world.json" ;;
  train) mkdir -p "$7" && echo '{}' > "$7/run.json" ;;
  export) echo "/data/registry/$(basename "$2")-0123456789abcdef" ;;
esac
"""


def test_setup_writes_an_experiment_of_the_trained_models_once(tmp_path: Path) -> None:
    """deploy/compose/setup.sh with a stand-in ctrserve: the order of its commands, the
    experiments file it writes (valid for the scorer), and nothing trained the second time."""
    bin_dir = _stub(tmp_path, SETUP_STUB)
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CTRSERVE_DATA": str(tmp_path / "data"), "CTRSERVE_EXPERIMENT": "ranker"}
    script = REPO / "deploy" / "compose" / "setup.sh"
    for _ in range(2):
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    calls = [line.split()[0] for line in (tmp_path / "calls").read_text().splitlines()]
    assert calls == ["synth", "train", "export", "train", "export", "load-features",
                     "load-features"]
    experiments = load_experiments(tmp_path / "data" / "experiments.yaml", None)
    (config,) = experiments.config.experiments
    assert config.name == "ranker"
    arms = [(a.name, a.bundle, a.weight, a.control) for a in config.arms]
    assert arms == [("control", "lr-0123456789abcdef", 0.5, True),
                    ("deepfm", "deepfm-0123456789abcdef", 0.5, False)]
