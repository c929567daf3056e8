"""The shipped daily schedule (deploy/schedule) calls a command that ctrserve accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ctrserve.cli import build_parser, commands

SCHEDULE = Path(__file__).resolve().parent.parent / "deploy" / "schedule"


def env_example() -> dict[str, str]:
    lines = (SCHEDULE / "retrain.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def parsed(command: str):
    env = env_example()
    command = re.sub(r'"?\$\{?(\w+)\}?"?', lambda m: env[m.group(1)], command)
    argv = shlex.split(command)
    assert argv[0].endswith("/ctrserve")
    return build_parser().parse_args(argv[1:])


def check_daily_retrain(args) -> None:
    assert args.func is commands.retrain
    assert (args.arm, args.drain, args.experiment) == ("all", True, "ranker")
    assert str(args.events) == env_example()["CTRSERVE_EVENTS_DIR"]


def test_the_systemd_unit_runs_the_daily_retrain():
    unit = (SCHEDULE / "ctrserve-retrain.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1)
    check_daily_retrain(parsed(exec_start))
    assert "EnvironmentFile=/etc/ctrserve/retrain.env" in unit


def test_the_crontab_runs_the_same_command():
    line = next(raw for raw in (SCHEDULE / "crontab").read_text().splitlines()
                if raw and raw[0].isdigit())
    command = line[line.index("/opt/ctrserve"):line.index(">>")]
    check_daily_retrain(parsed(command))


def test_the_timer_fires_daily():
    timer = (SCHEDULE / "ctrserve-retrain.timer").read_text()
    calendar = re.search(r"^OnCalendar=(.+)$", timer, re.M).group(1)
    assert "Persistent=true" in timer
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the OnCalendar expression was not "
                    "checked by systemd")
    out = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True,
                         text=True, check=True).stdout
    assert "Next elapse" in out
