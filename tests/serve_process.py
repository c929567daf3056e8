"""`ctrserve serve` as a subprocess on a port it binds itself.

A port probed free (bind to port 0, close, hand the number over) can be taken by another
process before the server binds it: under parallel tests that is a real race. Here the server
is started with `--port 0`, binds a free port itself, and its start-up line tells which; the
test reads it from stderr: uvicorn's ("Uvicorn running on http://127.0.0.1:PORT", logged at
INFO whatever --log-level says: the scorer configures uvicorn's own loggers at INFO) with one
worker, the parent's ("ctrserve running on http://127.0.0.1:PORT with N workers") with more.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    """`ctrserve serve --port 0` in a subprocess: the server binds a free port itself (nothing
    can take it between a probe and the bind) and its start-up line names it."""

    RUNNING = re.compile(r"(?:Uvicorn|ctrserve) running on (http://127\.0\.0\.1:\d+)")

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path = REPO):
        cmd = [sys.executable, "-m", "ctrserve", "serve", *args, "--port", "0"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self.found = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:  # drains stderr for the process's whole life
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.url is None and (match := self.RUNNING.search(line)):
                self.url = match.group(1)
                self.found.set()
        self.found.set()  # the process ended

    def wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        if not self.found.wait(timeout) or self.url is None:
            raise RuntimeError("the scorer did not start: " + "".join(self.lines)[-2000:])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + "".join(self.lines)[-2000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not ready in time")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
